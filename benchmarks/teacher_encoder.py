"""A DINO run's teacher backbone as an encoder beside the run's exported student (docs/methods.md §9, "The exported
encoder is the student's"): read from ``RUN/checkpoints/last.pt`` (the objective's ``teacher.backbone.*``), written
with the run's encoder metadata, provenance and configuration, so that `sonocl evaluate --init RUN OUT` compares the
two on the same folds.

    .venv/bin/python benchmarks/teacher_encoder.py RUN OUT
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sonocl.models import ENCODER_FILE, build_backbone, encoder_metadata, save_encoder
from sonocl.train.checkpoint import load_checkpoint

PREFIX = "teacher.backbone."


def main() -> int:
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    objective = load_checkpoint(run / "checkpoints" / "last.pt")["objective"]
    state = {key[len(PREFIX) :]: value for key, value in objective.items() if key.startswith(PREFIX)}
    if not state:
        raise SystemExit(f"{run}: its last.pt holds no {PREFIX}* weights (not a DINO run?)")
    metadata = encoder_metadata(run / ENCODER_FILE)
    backbone = build_backbone(metadata["arch"], int(metadata["channels"]), state, int(metadata["size"]))
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(backbone, out / ENCODER_FILE, {**metadata, "checkpoint": "last.pt (teacher)"})
    for name in ("provenance.json", "config.yaml"):
        shutil.copy(run / name, out / name)
    print(f"wrote {out / ENCODER_FILE}: the teacher of {run} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
