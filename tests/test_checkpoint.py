"""The checkpoint record (`sonocl.train.checkpoint.Checkpoint`): one schema that the loop writes and resumes from and
that `sonocl export` reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sonocl.train.checkpoint import STATEFUL, Checkpoint, CheckpointError, save_checkpoint, snapshot


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


def test_a_snapshot_keeps_the_state_of_its_epoch_and_reuses_the_buffers_it_supersedes() -> None:
    """A better epoch is kept in memory until the next write: training on must not change it, and the next better
    epoch is copied into its tensors instead of beside them (nothing else of it is shared with the live state)."""
    weight = torch.arange(4.0)
    live = {"model": {"w": weight, "steps": torch.tensor(3)}, "rng": [1, (torch.ones(2), "a")], "best": 2.5}
    first = snapshot(live)
    weight.add_(10)  # training goes on in place
    live["rng"][1][0].add_(1)
    assert torch.equal(first["model"]["w"], torch.arange(4.0)) and torch.equal(first["rng"][1][0], torch.ones(2))
    buffer = first["model"]["w"]
    second = snapshot(live, into=first)
    assert second["model"]["w"] is buffer and torch.equal(buffer, torch.arange(4.0) + 10)
    assert second["model"]["w"] is not weight and second["rng"][1][0] is not live["rng"][1][0]
    assert (
        second["rng"][0] == 1 and second["rng"][1][1] == "a" and torch.equal(second["rng"][1][0], torch.full((2,), 2.0))
    )
    live["model"]["w"] = torch.zeros(2)  # another shape: a new tensor, not a copy into the old buffer
    third = snapshot(live, into=second)
    assert third["model"]["w"] is not buffer and torch.equal(third["model"]["w"], torch.zeros(2))
