"""`sonocl.train.replay`: the report's "which videos were held out, which pairs and views at step s" is the loop's.

A tiny run on the phantom records, at every optimiser step, the views and batch the loop trained on (by wrapping
`loop.train_step`, which receives them); `replay_step` must give the same, bit for bit, over two epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sonocl.train import loop
from sonocl.train.replay import RunReplay, replay_step
from test_train import TINY, _config


@pytest.mark.parametrize("method", ["uscl", "awcl", "simclr"])  # augment first; extra gamma on labelled; mix first
def test_replay_step_gives_the_views_the_loop_trained_on(method: str, phantom_store, tmp_path: Path, monkeypatch):
    trained: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    train_step = loop.train_step

    def recording(run, view1, view2, targets, context):
        trained.append((context.step, view1.clone(), view2.clone(), targets.video.clone(), targets.label.clone()))
        return train_step(run, view1, view2, targets, context)

    monkeypatch.setattr(loop, "train_step", recording)
    argv = ["--store", str(phantom_store.root), "--method", method, "--out", str(tmp_path), *TINY]
    cfg = _config([*argv, "--epochs", "2", "--device", "cpu"])
    if method == "awcl":
        assert cfg.augment.gamma > 0
    loop.pretrain(cfg, tmp_path)

    replay = RunReplay(cfg, phantom_store)
    assert [step for step, *_ in trained] == list(range(2 * replay.steps_per_epoch))  # both epochs
    for step, view1, view2, video, label in trained:
        drawn = replay_step(cfg, phantom_store, step)
        assert torch.equal(torch.from_numpy(drawn.batch.video), video), step
        assert torch.equal(torch.from_numpy(drawn.batch.label), label), step
        assert torch.equal(drawn.view1, view1) and torch.equal(drawn.view2, view2), step
        again = replay.step(step)  # one replay, any order of steps: the same draw
        assert torch.equal(again.view1, view1) and torch.equal(again.view2, view2), step

    provenance = json.loads((tmp_path / "provenance.json").read_text())
    hashes = [video.content_hash for video in phantom_store.videos]
    assert sorted(hashes[v] for v in replay.held) == provenance["held_out"] and len(replay.held)
    assert sorted(hashes[v] for v in replay.kept) == provenance["trained_on"]
