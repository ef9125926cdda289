"""`python -m sonocl …` (also what `torchrun -m sonocl pretrain …` runs)."""

import sys

from sonocl.cli import main

if __name__ == "__main__":  # spawned worker processes re-import this module; they must not run the command
    sys.exit(main())
