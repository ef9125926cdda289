"""`python -m sonocl …` (also what `torchrun -m sonocl pretrain …` runs)."""

import sys

from sonocl.cli import main

sys.exit(main())
