"""The pretraining loop, `sonocl pretrain`: every method end to end on the phantom, schedules, checkpoints and
encoder export, the finite-loss check, bit-exact resume after SIGKILL, and the 2-process DDP parity."""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import tiny_pretrain, tiny_sets
from sonocl.methods.config import PretrainConfig
from sonocl.train.cli import add_arguments, resolve_config
from sonocl.train.config import ConfigError, merge, parse_assignment, preset
from sonocl.train.schedules import lr_schedule, momentum_schedule

TINY = tiny_pretrain(*tiny_sets())
TINY_OPTIONS = {"meta-uscl": ["--meta-batch-size", "4"], "moco": ["--queue-size", "64"]}


def _tiny(method: str) -> list[str]:
    return ["--method", method, *TINY, *TINY_OPTIONS.get(method, [])]


IDENTITY_AUGMENT = [
    "--set",
    "augment.crop_scale=[1.0, 1.0]",
    "--set",
    "augment.crop_ratio=[1.0, 1.0]",
    "--set",
    "augment.flip_p=0.0",
    "--set",
    "augment.jitter_p=0.0",
    "--set",
    "augment.blur_p=0.0",
]


def _config(argv: list[str]) -> PretrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_config(parser.parse_args(argv))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sonocl", "pretrain", *argv],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _step_rows(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["kind"] == "step"]


# ------------------------------------------------------------------------------------------ schedules


def test_uscl_schedule_is_constant_then_cosine_over_all_epochs() -> None:
    cfg = preset("uscl")
    lr = lr_schedule(3e-4, 300 * 27, cfg.schedule)
    assert lr.shape == (300 * 27,)
    assert np.all(lr[: 10 * 27] == 3e-4)  # quirk 11: 10 epochs at a constant LR, no ramp
    for epoch in (10, 11, 150, 299):  # CosineAnnealingLR(T_max=300) stepped from epoch 10 on
        expected = 3e-4 * 0.5 * (1 + math.cos(math.pi * (epoch - 10) / 300))
        assert lr[epoch * 27] == pytest.approx(expected, rel=1e-12)
    assert lr[-1] > 1e-7  # stops short of 0, as the reference


def test_meta_uscl_schedule_exponential_warmup_then_cosine() -> None:
    cfg = preset("meta-uscl")
    lr = lr_schedule(0.1, 300 * 10, cfg.schedule)
    for epoch in (0, 1, 5, 9):
        assert lr[epoch * 10] == pytest.approx(0.1 * (0.1 + 0.9 * math.exp(-5 * (1 - epoch / 10) ** 2)), rel=1e-12)
    assert lr[0] == pytest.approx(0.1 * 0.10606, rel=1e-4)
    for epoch in (10, 100, 299):
        assert lr[epoch * 10] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - 10) / 290)), rel=1e-12)
    assert lr[55] == pytest.approx(0.1 * (0.1 + 0.9 * math.exp(-5 * (1 - 5.5 / 10) ** 2)), rel=1e-12)  # per step


def test_linear_warmup_awcl_constant_and_momentum_schedules() -> None:
    simclr = preset("simclr").schedule
    lr = lr_schedule(1.0, 200, simclr)  # 10 % of the run (SimCLR's 10 of 100 epochs)
    assert lr[0] == pytest.approx(1 / 20) and lr[19] == pytest.approx(1.0) and lr[-1] < 0.01
    assert np.all(lr_schedule(1e-3, 12, preset("awcl").schedule) == 1e-3)
    byol = momentum_schedule(0.996, 1.0, 100)
    assert byol[0] == pytest.approx(0.996) and byol[-1] == pytest.approx(1.0) and np.all(np.diff(byol) >= 0)
    assert np.all(momentum_schedule(0.999, None, 7) == 0.999)


@pytest.mark.parametrize("method", ["simclr", "byol", "moco", "meta-uscl", "uscl"])
@pytest.mark.parametrize("total", [7, 240, 333, 500])
def test_warmup_never_exceeds_the_base_lr(method: str, total: int) -> None:
    """BYOL's 1 % warm-up over 240 steps is 2.4 steps: the linear ramp stops at the base LR, never above it."""
    lr = lr_schedule(0.5, total, preset(method).schedule)
    assert lr.max() <= 0.5 and lr[0] > 0
    peak = int(np.argmax(lr))
    assert np.all(np.diff(lr[: peak + 1]) >= 0)


# ------------------------------------------------------------------------------------------- config


def test_config_resolution_yaml_round_trip_and_set(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("epochs: 7\noptim:\n  weight_decay: 1e-5\n")
    cfg = _config(
        [
            "--store",
            "S",
            "--method",
            "meta-uscl",
            "--out",
            str(tmp_path / "r"),
            "--config",
            str(tmp_path / "c.yaml"),
            "--lr",
            "0.05",
            "--max-dist",
            "16",
            "--set",
            "augment.crop_scale=[0.5, 1.0]",
            "--set",
            "seed=3",
        ]
    )
    assert (cfg.epochs, cfg.optim.weight_decay, cfg.optim.lr, cfg.options.max_dist, cfg.seed) == (7, 1e-5, 0.05, 16, 3)
    assert cfg.augment.crop_scale == (0.5, 1.0) and cfg.optim.name == "sgd" and cfg.size == 64
    again = merge(preset("uscl"), __import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    with pytest.raises(ConfigError, match="optim.momentumm"):
        merge(cfg, parse_assignment("optim.momentumm=0.5"))
    with pytest.raises(ConfigError, match="expected an integer"):
        merge(cfg, parse_assignment("epochs=abc"))


def test_a_run_configuration_without_a_method_is_refused_naming_the_file(tmp_path: Path) -> None:
    from sonocl.train.config import load_run_config

    path = tmp_path / "config.yaml"
    path.write_text(preset("simclr").to_yaml().replace("method: simclr\n", ""))
    with pytest.raises(ConfigError, match=r"config.yaml: no method key; set one of .*simclr"):
        load_run_config(path)  # never silently read as a USCL run
    path.write_text(preset("simclr").to_yaml())
    assert load_run_config(path) == preset("simclr")


def test_presets_follow_the_papers() -> None:
    uscl, meta, awcl = preset("uscl"), preset("meta-uscl"), preset("awcl")
    assert (uscl.optim.name, uscl.optim.lr, uscl.optim.weight_decay, uscl.batch_size) == ("adam", 3e-4, 1e-4, 32)
    assert (uscl.model.projection_dim, uscl.options.semi_weight, uscl.augment.mean, uscl.augment.std) == (
        256,
        0.2,
        0.5,
        0.25,
    )
    assert (meta.optim.name, meta.optim.lr, meta.optim.momentum, meta.model.projection_dim, meta.size) == (
        "sgd",
        0.1,
        0.9,
        128,
        64,
    )
    assert (meta.augment.crop_scale, meta.augment.brightness, meta.options.cmw_lr) == ((0.7, 1.0), 0.64, 6e-5)
    assert (awcl.optim.lr, awcl.optim.weight_decay, awcl.schedule.decay, awcl.options.base_temperature) == (
        1e-3,
        1e-6,
        "none",
        0.07,
    )


# --------------------------------------------------------------------------------- every method runs


@pytest.fixture(scope="module")
def uscl_run(phantom_store, tmp_path_factory) -> Path:
    from sonocl.train.loop import pretrain

    out = tmp_path_factory.mktemp("uscl_run")
    pretrain(_config(["--store", str(phantom_store.root), "--out", str(out), *_tiny("uscl")]), out)
    return out


def _assert_outputs(run: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "encoder.safetensors", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert steps and len(epochs) == 1
    assert all(math.isfinite(float(r["loss"])) and float(r["images_per_s"]) > 0 for r in steps)
    assert math.isfinite(float(epochs[0]["val_loss"])) and float(epochs[0]["embedding_std"]) > 0


def _forbid_collectives(monkeypatch) -> None:
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called in a single-process run")

    for name in (
        "init_process_group",
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "barrier",
        "reduce_scatter",
        "all_gather_object",
        "broadcast_object_list",
    ):
        monkeypatch.setattr(dist, name, forbidden)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("method", ["simclr", "meta-uscl", "awcl", "ivpp", "moco", "byol"])
def test_every_method_runs_writes_all_outputs_and_calls_no_collective(
    method: str, phantom_store, tmp_path: Path, monkeypatch
) -> None:
    import torch.distributed as dist

    from sonocl.train.loop import pretrain

    _forbid_collectives(monkeypatch)
    argv = ["--store", str(phantom_store.root), "--out", str(tmp_path), *_tiny(method)]
    if method == "byol":
        argv += ["--set", "model.predictor_hidden=64"]
    pretrain(_config(argv), tmp_path)
    _assert_outputs(tmp_path)
    assert not dist.is_initialized()


def test_uscl_outputs_checkpoint_and_encoder_export(uscl_run: Path) -> None:
    import sonocl
    from sonocl.models import build_backbone, checkpoint_backbone_state
    from sonocl.train.checkpoint import load_checkpoint

    _assert_outputs(uscl_run)
    rows = _step_rows(uscl_run)
    assert {"part_contrastive", "part_semi_supervised", "lr", "epoch", "step", "step_seconds"} <= set(rows[0])
    training = sum(float(row["step_seconds"]) for row in rows)  # the run's efficiency: training share of its wall time
    assert 0 < training < float(rows[-1]["seconds"])
    state = load_checkpoint(uscl_run / "checkpoints" / "best.pt")  # weights_only=True
    for key in (
        "model",
        "objective",
        "optimizer",
        "scaler",
        "epoch",
        "step_in_epoch",
        "rng",
        "global_step",
        "encoder_metadata",
        "config",
        "best_val_loss",
    ):
        assert key in state, key
    assert state["encoder_metadata"] == {
        "arch": "resnet18",
        "channels": 1,
        "size": 32,
        "mean": 0.5,
        "std": 0.25,
        "method": "uscl",
    }
    encoder = sonocl.load_encoder(str(uscl_run))
    plain = torchvision.models.resnet18()
    from safetensors.torch import load_file

    missing, unexpected = plain.load_state_dict(load_file(str(uscl_run / "encoder.safetensors")), strict=False)
    assert not unexpected and all(k.startswith("fc.") for k in missing)
    ours = build_backbone("resnet18", 1, checkpoint_backbone_state(state)).eval()
    grey = torch.rand(2, 1, 32, 32)
    encoder.eval()
    plain.fc = torch.nn.Identity()
    plain.eval()
    with torch.no_grad():
        reference = ours(grey)
        assert torch.allclose(encoder(grey).flatten(1), reference, atol=1e-4)
        assert torch.allclose(plain(grey.expand(-1, 3, -1, -1)), reference, atol=1e-4)


def test_nonfinite_loss_stops_with_step_and_parts(phantom_store, tmp_path: Path, monkeypatch) -> None:
    from sonocl.methods import objectives
    from sonocl.train.loop import NonFiniteLossError, pretrain

    original = objectives.GroupContrastive.forward

    def poisoned(self, model, view1, view2, batch, context):
        loss, parts = original(self, model, view1, view2, batch, context)
        return (loss * float("nan"), parts) if context.step == 1 else (loss, parts)

    monkeypatch.setattr(objectives.GroupContrastive, "forward", poisoned)
    cfg = _config(["--store", str(phantom_store.root), "--out", str(tmp_path), *_tiny("simclr")])
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss nan at step 2 \(epoch 1, step 2 of \d+.*contrastive="
    ):
        pretrain(cfg, tmp_path)


# ------------------------------------------------------------------------------ resume, bit for bit


def test_resume_after_sigkill_is_bit_identical(phantom_store, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sonocl.train.checkpoint import load_checkpoint

    common = [
        "--store",
        str(phantom_store.root),
        "--method",
        "uscl",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--size",
        "32",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--deterministic",
        "--no-progress",
        "--set",
        "model.projection_hidden=64",
        "--set",
        "knn_frames_per_video=2",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _cli(*common, "--out", str(straight))
    victim = _cli(*common, "--out", str(killed), "--checkpoint-every-steps", "1")
    total = 4  # 10 training videos // 4 = 2 steps per epoch × 2 epochs
    kill_after = random.Random().randint(1, total - 1)
    deadline = time.monotonic() + 240
    while len(_step_rows(killed)) < kill_after and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = len(_step_rows(killed))
    assert done < total, "the run finished before it could be killed"
    resumed = _cli(*common, "--out", str(killed), "--checkpoint-every-steps", "1", "--resume")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, out

    a, b = load_file(str(straight / "encoder.safetensors")), load_file(str(killed / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
        f"encoders differ (killed after {done} steps)"
    )
    last_a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    last_b = load_checkpoint(killed / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a), f"final weights differ (killed after {done} steps)"
    assert [r["loss"] for r in _step_rows(straight)] == [r["loss"] for r in _step_rows(killed)]


# ------------------------------------------------------------------------------------- DDP parity


def test_two_process_gloo_matches_one_process(phantom_store, tmp_path: Path) -> None:
    common = [
        "--store",
        str(phantom_store.root),
        "--method",
        "simclr",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--size",
        "32",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--threads",
        "1",
        "--set",
        "options.items=videos",
        "--set",
        "model.freeze_bn=true",
        "--set",
        "model.projection_hidden=64",
        "--set",
        "knn_frames_per_video=2",
        *IDENTITY_AUGMENT,
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.Popen(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "sonocl",
            "pretrain",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    one = _cli(*common, "--out", str(tmp_path / "one"))
    out_two, _ = two.communicate(timeout=300)
    out_one, _ = one.communicate(timeout=300)
    assert two.returncode == 0, out_two
    assert one.returncode == 0, out_one
    loss_one = float(_step_rows(tmp_path / "one")[0]["loss"])
    loss_two = float(_step_rows(tmp_path / "two")[0]["loss"])
    assert abs(loss_one - loss_two) < 1e-5, (loss_one, loss_two)


def test_the_best_checkpoint_is_chosen_among_every_epoch_not_only_monitored_ones(
    phantom_store, tmp_path, monkeypatch
) -> None:
    """USCL's and Meta-USCL's reference code keep the epoch of lowest validation loss, checking every epoch; the
    monitors (kNN, collapse) run only every ``monitor_every`` epochs. Here the held-out loss is lowest after epoch 2,
    and only epoch 3 (the last) is monitored: best.pt and the encoder must be epoch 2's."""
    from sonocl.models import checkpoint_backbone_state
    from sonocl.train import loop
    from sonocl.train.checkpoint import load_checkpoint

    losses = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(loop, "validation_loss", lambda run: next(losses))
    out = tmp_path / "run"
    argv = ["--store", str(phantom_store.root), "--out", str(out), *_tiny("uscl"), "--epochs", "3",
            "--set", "monitor_every=10", "--label-rate", "0"]  # fmt: skip
    loop.pretrain(_config(argv), out)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert best["epoch"] == 2 and best["best_val_loss"] == 1.0 and last["epoch"] == 3
    from safetensors.torch import load_file

    encoder = load_file(str(out / "encoder.safetensors"))
    expected = checkpoint_backbone_state(best)
    assert not torch.equal(expected["layer4.1.conv2.weight"], checkpoint_backbone_state(last)["layer4.1.conv2.weight"])
    torch.testing.assert_close(encoder["layer4.1.conv2.weight"], expected["layer4.1.conv2.weight"])


@pytest.mark.parametrize(("every_seconds", "writes"), [(1e9, 1), (0.0, 3)])
def test_checkpoints_are_written_when_due_not_at_every_monitor(
    phantom_store, tmp_path, monkeypatch, every_seconds: float, writes: int
) -> None:
    """Monitors every epoch do not write ``last.pt`` every epoch: it is written every ``checkpoint_every_seconds``
    and after the last epoch (a monitored epoch's better loss waits in memory for the next write, as any epoch's)."""
    from sonocl.train import loop

    written: list[int] = []
    save = loop.save_checkpoints
    monkeypatch.setattr(loop, "save_checkpoints", lambda run: (written.append(run.epoch), save(run)))
    out = tmp_path / "run"
    argv = ["--store", str(phantom_store.root), "--out", str(out), *_tiny("uscl"), "--epochs", "3",
            "--set", "monitor_every=1", "--set", f"checkpoint_every_seconds={every_seconds}"]  # fmt: skip
    loop.pretrain(_config(argv), out)
    assert written == [3] if writes == 1 else written == [1, 2, 3]
    epochs = [row for row in csv.DictReader(open(out / "metrics.csv")) if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == ["1", "2", "3"]  # monitored every epoch all the same


def test_the_monitors_embed_each_distinct_frame_once(phantom_store, tmp_path, monkeypatch) -> None:
    """The collapse frames are the held-out labelled frames, which the kNN monitor also embeds: one forward pass each,
    and the same metrics as embedding the three sets apart."""
    from sonocl.train import loop, validation
    from sonocl.train.monitor import embedding_std, knn_accuracy

    runs, embedded = [], []
    features = validation.backbone_features
    monkeypatch.setattr(
        validation,
        "backbone_features",
        lambda b, s, frames, **k: (embedded.append(len(frames)), features(b, s, frames, **k))[1],
    )
    real_monitors = validation.monitors
    monkeypatch.setattr(loop, "monitors", lambda run: (runs.append(run), real_monitors(run))[1])
    out = tmp_path / "run"
    loop.pretrain(
        _config(["--store", str(phantom_store.root), "--out", str(out), *_tiny("uscl"), "--epochs", "1"]), out
    )
    run = runs[0]
    data = run.data
    bank, query, collapse = data.bank[0], data.query[0], data.collapse_frames
    assert set(collapse) <= set(query) and len(bank) and len(query)
    assert embedded == [len(np.unique(np.concatenate([bank, query, collapse])))]

    def apart(frames):
        return features(run.model.backbone, data.store, frames, size=run.cfg.size, mean=run.cfg.augment.mean,
                        std=run.cfg.augment.std, channels=run.cfg.model.channels, device=run.device)  # fmt: skip

    metrics = run.epoch_metrics
    run.model.eval()
    with torch.no_grad():
        expected_std = embedding_std(run.model.projector(apart(collapse)).float())
    expected_knn = knn_accuracy(apart(bank), torch.from_numpy(data.bank[1]), apart(query),
                                torch.from_numpy(data.query[1]), k=run.cfg.knn_k)  # fmt: skip
    assert abs(metrics["knn_acc"] - expected_knn) <= 1 / len(query)  # a near tie may vote otherwise in another batch
    assert metrics["embedding_std"] == pytest.approx(expected_std, rel=1e-5)


def test_the_held_out_views_are_made_once_and_give_the_loss_made_afresh(phantom_store, tmp_path, monkeypatch) -> None:
    """Every epoch's validation loss is of the same fixed-seed views: kept after the first epoch, they give exactly
    the loss of views made again; over `HELD_OUT_VIEWS_BYTES` they are made again at every call and not kept."""
    from sonocl.train import loop, validation

    runs, losses = [], []
    real_loss = validation.validation_loss

    def recorded(run):
        runs.append(run)
        losses.append(real_loss(run))
        return losses[-1]

    monkeypatch.setattr(loop, "validation_loss", recorded)
    out = tmp_path / "run"
    loop.pretrain(_config(["--store", str(phantom_store.root), "--out", str(out), *_tiny("uscl"), "--epochs", "2",
                           "--set", "val_fraction=0.5"]), out)  # fmt: skip
    run = runs[-1]
    kept = run.held_out_views
    assert len(runs) == 2 and kept is not None and len(kept) == len(run.data.val_batches) > 0
    assert real_loss(run) == losses[-1] and run.held_out_views is kept

    run.held_out_views = None
    monkeypatch.setattr(validation, "HELD_OUT_VIEWS_BYTES", 0)
    assert real_loss(run) == losses[-1] and run.held_out_views is None
    assert real_loss(run) == losses[-1] and run.held_out_views is None


def test_a_resumed_run_warns_only_about_settings_that_changed(phantom_store, tmp_path: Path, capsys) -> None:
    """The saved configuration keeps lists where the live one has tuples (the stores): an unchanged resume says
    nothing; one with another batch size names it."""
    from sonocl.cli import main

    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "simclr", "--out", str(tmp_path),
            *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=1))]  # fmt: skip
    assert main([*argv, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--steps", "2", "--resume"]) == 0
    assert "resuming with store" not in capsys.readouterr().err
    assert main([*argv, "--steps", "3", "--resume", "--batch-size", "8"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "resuming with" in line]
    assert [line.split(" (")[0] for line in lines if "steps" not in line] == [
        "sonocl pretrain: resuming with batch_size 8"
    ]
