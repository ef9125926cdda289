"""The checkpoint record (`sonocl.train.checkpoint.Checkpoint`): one schema that the loop writes and resumes from and
that `sonocl export` reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sonocl.train.checkpoint import STATEFUL, Checkpoint, CheckpointError, save_checkpoint


def _record() -> Checkpoint:
    return Checkpoint(
        config={"method": "uscl", "batch_size": 4},
        states={name: {"weight": torch.full((2,), float(i))} for i, name in enumerate(STATEFUL)},
        epoch=2,
        step_in_epoch=3,
        best_val_loss=1.5,
        elapsed_seconds=10.0,
        training_seconds=8.0,
        global_step=23,
        steps_per_epoch=10,
        world_size=1,
        metrics={"val_loss": 1.5},
        rng={"python": [3, [1, 2], None]},
        encoder_metadata={"arch": "resnet18"},
    )


def test_a_checkpoint_is_written_flat_and_read_back_whole(tmp_path: Path) -> None:
    record = _record()
    state = record.to_state()
    assert (
        state["format"] == 3
        and state["global_step"] == 23
        and torch.equal(state["optimizer"]["weight"], 2 * torch.ones(2))
    )
    save_checkpoint(state, tmp_path / "last.pt")
    again = Checkpoint.read(tmp_path / "last.pt")
    assert again.global_step == 23 and again.metrics == {"val_loss": 1.5} and again.config == record.config
    assert all(torch.equal(again.states[name]["weight"], record.states[name]["weight"]) for name in STATEFUL)


def test_another_format_or_other_keys_are_named_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    state = _record().to_state()
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint format 2 is not 3"):
        Checkpoint.from_state({**state, "format": 2}, path)
    del state["scaler"]
    state["extra"] = 1
    with pytest.raises(CheckpointError, match=r"last\.pt: .*missing: \['scaler'\]; unexpected: \['extra'\]"):
        Checkpoint.from_state(state, path)
