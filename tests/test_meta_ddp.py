"""Meta-USCL under DDP (issue 13): the meta step of 2 gloo processes on half batches equals the one-process step on
the whole batch, and `sonocl pretrain --method meta-uscl` under torchrun matches one process at the same global
batch (step losses, meta losses, the CMW-Net and its Adam state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sonocl.losses import GroupInfoNCE
from sonocl.methods import meta_step
from sonocl.models import CMWNet, ContrastiveModel
from sonocl.train import distributed as ddp
from test_train import IDENTITY_AUGMENT, _env, _step_rows

B, IN, FEAT, WORLD = 8, 12, 6, 2
CASES = [
    {"sgd": {"momentum": 0.9, "weight_decay": 1e-2}, "primed": True, "inner_lr": None, "prior": True, "meta": True},
    {"sgd": {"momentum": 0.9, "nesterov": True}, "primed": False, "inner_lr": None, "prior": True, "meta": False},
    {"sgd": {"momentum": 0.8, "dampening": 0.3}, "primed": True, "inner_lr": 0.05, "prior": False, "meta": True},
]


def _setup(case: dict, seed: int):
    """Model (batch-norm in eval mode with non-trivial running statistics, as with model.freeze_bn), CMW-Net,
    optimizer and data, the same in every process; float64."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
    model = ContrastiveModel(backbone, FEAT, projection_hidden=5, projection_dim=4).double()
    model.backbone[2].running_mean.normal_()
    model.backbone[2].running_var.uniform_(0.5, 2.0)
    model.train()
    model.backbone[2].eval()
    cmw = CMWNet(FEAT, hidden_dim=10).double()
    optimizer = torch.optim.SGD(
        [{"params": model.backbone.parameters(), "lr": 0.3}, {"params": model.projector.parameters(), "lr": 0.1}],
        **case["sgd"],
    )
    make = lambda: torch.randn(B, 1, 3, 4, dtype=torch.float64)  # noqa: E731
    data = {
        "v1": make(),
        "v2": make(),
        "m1": make(),
        "m2": make(),
        "group": torch.tensor([0, 1, 2, 1, 3, 3, 4, 0]),  # groups 0 and 1 span both ranks' shards
        "prior": torch.rand(B, dtype=torch.float64) + 0.5 if case["prior"] else None,
        "meta_group": torch.tensor([4, 9, 7, 9, 4, 9, 5, 6]) if case["meta"] else None,
    }
    if case["primed"]:  # momentum buffers, and θ moved, identically everywhere
        _, z1 = model(data["m1"])
        _, z2 = model(data["m2"])
        GroupInfoNCE(0.5)(z1, z2).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, cmw, optimizer, data


def _meta_step(case: dict, seed: int, rows: slice, gather) -> meta_step.MetaGradient:
    model, cmw, optimizer, data = _setup(case, seed)
    part = {k: None if v is None else v[rows] for k, v in data.items()}
    h1, z1 = model(part["v1"])
    h2, z2 = model(part["v2"])
    return meta_step.cmw_meta_gradient(
        model, cmw, GroupInfoNCE(0.5), part["v1"], part["v2"], h1, h2, z1, z2, part["group"], part["prior"],
        part["m1"], part["m2"], optimizer, case["inner_lr"], meta_positive_group=part["meta_group"], gather=gather,
    )  # fmt: skip


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        shard = B // WORLD
        results = [
            _meta_step(case, seed, slice(rank * shard, (rank + 1) * shard), ddp.gather_with_grad)
            for seed, case in enumerate(CASES)
        ]
        torch.save([(r.cmw_grads, r.meta_loss) for r in results], Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_meta_step_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for seed, case in enumerate(CASES):
        expected = _meta_step(case, seed, slice(None), None)
        assert any(g.abs().max() > 0 for g in expected.cmw_grads)
        for results in ranks:
            grads, meta_loss = results[seed]
            torch.testing.assert_close(meta_loss, expected.meta_loss, rtol=1e-10, atol=1e-12)
            for got, want in zip(grads, expected.cmw_grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * max(1.0, float(want.abs().max())))
        for a, b in zip(ranks[0][seed][0], ranks[1][seed][0]):  # the all-reduce gives every rank the same bits
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ end to end


def test_two_process_meta_uscl_pretrain_matches_one_process(phantom_store, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes of batch 4 and meta batch 2 each, against one process of batch 8 and meta batch 4:
    the same losses and meta losses over the steps, and the same CMW-Net and Adam moments in rank 0's checkpoint
    (a large CMW-Net LR, so the meta steps move the weights that later steps use; fp32, so the hypergradient
    agrees to ~1e-5 relative, the weights to ~1e-4)."""
    common = [
        "--store", str(phantom_store.root), "--method", "meta-uscl", "--steps", "3", "--batch-size", "8",
        "--meta-batch-size", "4", "--cmw-lr", "0.05", "--size", "32", "--precision", "fp32", "--workers", "0",
        "--device", "cpu", "--no-progress", "--threads", "1", "--set", "options.items=videos",
        "--set", "model.freeze_bn=true", "--set", "model.projection_hidden=64", "--set", "knn_frames_per_video=1",
        *IDENTITY_AUGMENT,
    ]  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "sonocl", "pretrain", *common,
         "--out", str(tmp_path / "two")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    one = subprocess.Popen(
        [sys.executable, "-m", "sonocl", "pretrain", *common, "--out", str(tmp_path / "one")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out_two, _ = two.communicate(timeout=300)
    out_one, _ = one.communicate(timeout=300)
    assert two.returncode == 0, out_two
    assert one.returncode == 0, out_one
    rows_one, rows_two = _step_rows(tmp_path / "one"), _step_rows(tmp_path / "two")
    assert len(rows_one) == len(rows_two) == 3
    for a, b in zip(rows_one, rows_two):
        for key, tolerance in (
            ("loss", 1e-5),
            ("part_meta", 1e-5),
            ("part_weight_mean", 1e-4),
            ("part_weight_std", 1e-4),
        ):
            assert abs(float(a[key]) - float(b[key])) < tolerance, (key, a[key], b[key])
    state_one, state_two = (
        torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False)["objective"]
        for run in ("one", "two")
    )
    cmw_keys = [key for key in state_one if key.startswith("cmw.")]
    assert cmw_keys
    for key in cmw_keys:  # Adam's step is ±LR for any tiny gradient element, so fp32 noise moves some by ~1e-4
        torch.testing.assert_close(state_two[key], state_one[key], rtol=1e-4, atol=1e-3)
    adam_one, adam_two = (state["_extra_state"]["cmw_optimizer"]["state"] for state in (state_one, state_two))
    for index, moments in adam_one.items():
        for name in ("exp_avg", "exp_avg_sq"):
            want, got = moments[name], adam_two[index][name]
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
