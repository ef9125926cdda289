"""MoCo v2 as the paper trains it (issue 22, items 1 and 6; ``docs/methods.md`` §5): one query view per pair, its
InfoNCE checked in float64 against the paper's equation written out here (not sonocl's loss code), the queue's
update, and Shuffle-BN: no key is normalised with the statistics of its query's batch, in one process (sub-batches)
and across two gloo processes (the reference's shuffle), and every key comes back to its own item."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import make_objective, tiny_pretrain, tiny_sets
from sonocl.cli import main
from sonocl.methods.moco import shuffle_generator, shuffle_groups
from sonocl.methods.objectives import BatchTensors, StepContext
from sonocl.models import ContrastiveModel
from sonocl.train import distributed as ddp

IN, FEAT, DIM, TAU = 12, 6, 4, 0.2


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> ContrastiveModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
    return ContrastiveModel(backbone, FEAT, projection_hidden=5, projection_dim=DIM).to(dtype)


def _views(seed: int, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 1, 3, 4, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))


def _batch(n: int, video: torch.Tensor | None = None) -> BatchTensors:
    return BatchTensors(torch.arange(n), torch.ones(n), torch.full((n,), -1), video)


def _context(model: nn.Module, step: int = 0, gather=None) -> StepContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepContext(step=step, optimizer=optimizer, lr=0.1, gather=gather)


def _paper_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """He et al. 2020, Eq. 1 (MoCo v2 keeps it): L_q = −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_queue exp(q·k/τ)) with
    q, k unit vectors; logits = [q·k₊, q·queue]/τ and cross-entropy with target 0, averaged over the queries."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / tau
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def _rows_of(images: torch.Tensor, views: torch.Tensor) -> list[int]:
    """The item (row of ``views``) of each row of ``images``: the encoder's inputs, named by their items."""
    flat, pool = images.flatten(1), views.flatten(1)
    rows = [int(torch.nonzero((pool == row).all(dim=1))[0]) for row in flat]
    assert len(rows) == len(flat)
    return rows


class _Recorder:
    """The items of every key-encoder call and the input of every key-encoder BatchNorm call (forward hooks)."""

    def __init__(self, objective: nn.Module, views: torch.Tensor) -> None:
        self.calls: list[list[int]] = []
        self.bn_inputs: dict[str, list[torch.Tensor]] = {}
        objective.key_encoder.register_forward_pre_hook(
            lambda module, args: self.calls.append(_rows_of(args[0], views))
        )
        for name, module in objective.key_encoder.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self.bn_inputs[name] = []
                module.register_forward_pre_hook(
                    lambda module, args, name=name: self.bn_inputs[name].append(args[0].detach().clone())
                )


# --------------------------------------------------------------------------------------------- the loss


def test_v2_loss_is_the_papers_equation_in_float64_one_query_view_per_pair() -> None:
    n = 8
    model = _model(seed=1, dtype=torch.float64)
    online = copy.deepcopy(model)
    objective = make_objective("moco", model, queue_size=20, ema_start=0.9, shuffle_bn_groups=1).double()
    key = copy.deepcopy(objective.key_encoder)
    queue = objective.queue.clone()
    assert objective.loss == "v2" and queue.dtype == torch.float64
    forwards = []
    model.backbone.register_forward_hook(lambda *_: forwards.append(1))
    v1, v2 = _views(2, n, torch.float64)
    loss, parts = objective(model, v1, v2, _batch(n), _context(model))
    assert len(forwards) == 1  # one query view: view 1 alone goes through the online model
    assert loss.dtype == torch.float64
    loss_value = float(loss.detach())
    _, q1 = online(v1)
    _, q2 = online(v2)
    with torch.no_grad():
        k1, k2 = key(v1), key(v2)
    expected = _paper_loss(q1, k2, queue, TAU)
    assert loss_value == pytest.approx(float(expected.detach()), rel=1e-12)
    assert parts == {"moco": pytest.approx(float(expected.detach()), rel=1e-12)}
    symmetric = 0.5 * (expected + _paper_loss(q2, k1, queue, TAU))
    assert abs(loss_value - float(symmetric.detach())) > 1e-3  # the symmetric form would be another number
    loss.backward()  # the gradient reaches the online model through q alone
    reference_loss = _paper_loss(q1, k2.detach(), queue, TAU)
    reference_loss.backward()
    for got, want in zip(model.parameters(), online.parameters()):
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in objective.key_encoder.parameters())

    # The batch's keys are enqueued once (view 2's), after the step; the ring buffer wraps.
    objective.after_step(model)
    torch.testing.assert_close(objective.queue[:n], F.normalize(k2, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(objective.queue[n:], queue[n:])
    assert int(objective.queue_ptr) == n
    objective(model, v1, v2, _batch(n), _context(model, step=1))
    objective.after_step(model)
    assert int(objective.queue_ptr) == (2 * n) % 20
    assert objective.queue_video.tolist() == [-1] * 20  # no video given: no key is ever masked


def test_symmetric_option_is_both_directions_and_enqueues_both_views_keys() -> None:
    n = 6
    model = _model(seed=3, dtype=torch.float64)
    online = copy.deepcopy(model)
    objective = make_objective(
        "moco", model, queue_size=24, ema_start=0.9, loss="symmetric", shuffle_bn_groups=1
    ).double()
    key, queue = copy.deepcopy(objective.key_encoder), objective.queue.clone()
    v1, v2 = _views(4, n, torch.float64)
    loss, _ = objective(model, v1, v2, _batch(n), _context(model))
    _, q1 = online(v1)
    _, q2 = online(v2)
    with torch.no_grad():
        k1, k2 = key(v1), key(v2)
    expected = 0.5 * (_paper_loss(q1, k2, queue, TAU) + _paper_loss(q2, k1, queue, TAU))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    objective.after_step(model)
    assert int(objective.queue_ptr) == 2 * n
    torch.testing.assert_close(objective.queue[: 2 * n], F.normalize(torch.cat([k1, k2]), dim=1))


def test_v2_never_uses_a_key_of_the_query_s_own_video_as_a_negative() -> None:
    n = 6
    model = _model(seed=5, dtype=torch.float64)
    objective = make_objective("moco", model, queue_size=n, ema_start=0.9).double()
    videos = torch.tensor([0, 0, 1, 1, 2, 2])
    v1, v2 = _views(6, n, torch.float64)
    objective(model, v1, v2, _batch(n, videos), _context(model))
    objective.after_step(model)  # the batch's keys, with their videos, are now the whole queue
    assert objective.queue_video.tolist() == videos.tolist()
    online = copy.deepcopy(model)
    loss, _ = objective(model, v1, v2, _batch(n, videos), _context(model, step=1))
    k2 = objective._pending[0]
    _, q1 = online(v1)
    q = q1 / q1.norm(dim=1, keepdim=True)
    negatives = (q @ objective.queue.T).masked_fill(videos[:, None] == objective.queue_video[None, :], -math.inf)
    logits = torch.cat([(q * k2).sum(1, keepdim=True), negatives], dim=1) / TAU
    expected = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert _paper_loss(q1, k2, objective.queue, TAU).item() > loss.item()  # the near-duplicates were left out


# ---------------------------------------------------------------------------------------------- Shuffle-BN


@pytest.mark.parametrize("groups", [None, 2, 3, 4])
def test_shuffle_bn_no_key_sub_batch_is_the_query_batch_and_keys_come_back_in_order(groups: int | None) -> None:
    """Fails without Shuffle-BN: the key encoder's BatchNorm layers would see the query's batch (all of it)."""
    n = 8
    model = _model(seed=7)
    objective = make_objective("moco", model, queue_size=32, ema_start=0.9, shuffle_bn_groups=groups)
    key = copy.deepcopy(objective.key_encoder)
    v1, v2 = _views(8, n)
    keys = _Recorder(objective, v2)
    query_batches = []
    model.backbone.register_forward_pre_hook(lambda module, args: query_batches.append(_rows_of(args[0], v1)))
    loss, _ = objective(model, v1, v2, _batch(n), _context(model, step=5))

    query = set(query_batches[0])
    assert len(query_batches) == 1 and query == set(range(n))  # the query's BN batch: the whole batch (view 1)
    expected_groups = {None: 2, 2: 2, 3: 3, 4: 4}[groups]  # automatic: at least 2 in one process
    assert len(keys.calls) == expected_groups
    flat = [i for call in keys.calls for i in call]
    assert sorted(flat) == list(range(n)) and flat != list(range(n))  # a partition of the batch, shuffled
    for call in keys.calls:
        assert set(call) != query and len(call) >= 2
    # The statistics every key-encoder BatchNorm call normalises with are its sub-batch's, never the query batch's.
    for name, inputs in keys.bn_inputs.items():
        assert [len(x) for x in inputs] == [len(call) for call in keys.calls], name
    linear = key.backbone[1]
    for call, seen in zip(keys.calls, keys.bn_inputs["backbone.2"]):
        by_hand = linear(v2[call].flatten(1))
        torch.testing.assert_close(seen.mean(0), by_hand.mean(0))
        torch.testing.assert_close(seen.var(0, unbiased=False), by_hand.var(0, unbiased=False))
        assert not torch.allclose(seen.mean(0), linear(v2.flatten(1)).mean(0))

    # Keys in the batch's order: the key of item i is item i's encoding within its own sub-batch (train-mode BN).
    expected = torch.empty(n, DIM)
    with torch.no_grad():
        for call in keys.calls:
            expected[call] = F.normalize(key(v2[call]), dim=1)
    objective.after_step(model)
    torch.testing.assert_close(objective.queue[:n], expected)
    unshuffled = torch.cat([F.normalize(key(v2[call]), dim=1) for call in keys.calls]).detach()
    assert not torch.allclose(objective.queue[:n], unshuffled)  # not left in the shuffled order
    plain = F.normalize(key(v2), dim=1).detach()
    assert not torch.allclose(objective.queue[:n], plain)  # BN statistics of the sub-batches, not the whole batch


def test_shuffle_bn_changes_no_key_with_deterministic_batchnorm() -> None:
    """In eval mode (running statistics) shuffling, splitting and unshuffling must give each item its own key."""
    n = 9
    model = _model(seed=9)
    objective = make_objective("moco", model, queue_size=32, ema_start=0.9, shuffle_bn_groups=3)
    key = copy.deepcopy(objective.key_encoder).eval()
    model.eval()
    v1, v2 = _views(10, n)
    keys = _Recorder(objective, v2)
    with torch.no_grad():
        objective(model, v1, v2, _batch(n), _context(model, step=2))
    assert len(keys.calls) == 3 and [i for call in keys.calls for i in call] != list(range(n))
    torch.testing.assert_close(objective._pending[0], F.normalize(key(v2), dim=1).detach())


def test_shuffle_permutation_is_a_function_of_the_seed_and_step_alone() -> None:
    """Resume stays bit-exact: the permutation comes from (run seed, global step), not from torch's global RNG."""
    n = 8

    def groups_at(step: int, seed: int = 0, global_seed: int = 0) -> list[list[int]]:
        model = _model(seed=11)
        objective = make_objective("moco", model, queue_size=32, ema_start=0.9, shuffle_bn_groups=2)
        objective.seed = seed
        v1, v2 = _views(12, n)
        keys = _Recorder(objective, v2)
        torch.manual_seed(global_seed)
        objective(model, v1, v2, _batch(n), _context(model, step=step))
        return keys.calls

    assert groups_at(3) == groups_at(3, global_seed=99)
    assert groups_at(3) != groups_at(4)
    assert groups_at(3) != groups_at(3, seed=1)
    perm = torch.randperm(n, generator=shuffle_generator(0, 3))
    assert groups_at(3) == [perm[:4].tolist(), perm[4:].tolist()]


def test_shuffle_groups_rule() -> None:
    assert shuffle_groups(None, 32, distributed=False) == 2  # the demo's batch: two sub-batches of 16
    assert shuffle_groups(None, 256, distributed=False) == 8  # the reference's 8 GPUs × 32
    assert shuffle_groups(None, 32, distributed=True) == 1  # one shard per rank, as the reference
    assert shuffle_groups(None, 128, distributed=True) == 4
    assert shuffle_groups(5, 6, distributed=False) == 3  # a BatchNorm batch keeps two samples at least
    assert shuffle_groups(None, 3, distributed=False) == 1
    assert shuffle_groups(1, 64, distributed=False) == 1  # off in one process


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="loss must be one of v2, symmetric"):
        make_objective("moco", _model(), loss="v3")
    with pytest.raises(ValueError, match="shuffle_bn_groups must be ≥ 1"):
        make_objective("moco", _model(), shuffle_bn_groups=0)


# ------------------------------------------------------------------------------------------------------ DDP

WORLD, LOCAL, STEP = 2, 4, 3


def _ddp_objective(groups: int):
    model = _model(seed=13, dtype=torch.float64)
    objective = make_objective("moco", model, queue_size=16, ema_start=0.9, shuffle_bn_groups=groups).double()
    return model, objective


def _ddp_worker(rank: int, tmp: str, groups: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model, objective = _ddp_objective(groups)
        v1, v2 = _views(14, WORLD * LOCAL, torch.float64)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        keys = _Recorder(objective, v2)  # items named by their row of the global batch
        loss, _ = objective(model, v1[rows], v2[rows], _batch(LOCAL), _context(model, STEP, ddp.gather_with_grad))
        objective.after_step(model)
        torch.save({"loss": float(loss), "calls": keys.calls, "queue": objective.queue.clone()}, f"{tmp}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("groups", [1, 2])
def test_two_process_shuffle_bn_encodes_each_rank_s_shard_of_the_shuffled_global_batch(
    groups: int, tmp_path: Path
) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path), groups), nprocs=WORLD, join=True)
    model, objective = _ddp_objective(groups)
    queue, key = objective.queue.clone(), copy.deepcopy(objective.key_encoder)
    v1, v2 = _views(14, WORLD * LOCAL, torch.float64)
    perm = torch.randperm(WORLD * LOCAL, generator=shuffle_generator(0, STEP))  # every rank draws this one
    expected_keys = torch.empty(WORLD * LOCAL, DIM, dtype=torch.float64)
    results = [torch.load(tmp_path / f"r{rank}.pt") for rank in range(WORLD)]
    for rank, result in enumerate(results):
        shard = perm[rank * LOCAL : (rank + 1) * LOCAL]
        assert result["calls"] == [part.tolist() for part in shard.tensor_split(groups)]
        for call in result["calls"]:
            assert set(call) != set(range(rank * LOCAL, (rank + 1) * LOCAL))  # not the rank's query batch
            with torch.no_grad():
                expected_keys[call] = F.normalize(key(v2[call]), dim=1)
    for rank, result in enumerate(results):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        _, q = model(v1[rows])
        assert result["loss"] == pytest.approx(_paper_loss(q, expected_keys[rows], queue, TAU).item(), rel=1e-12)
        # Every rank enqueues every rank's keys, in the global batch's order: all queues stay equal.
        torch.testing.assert_close(result["queue"][: WORLD * LOCAL], expected_keys, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("extra", [[], ["--loss", "symmetric", "--shuffle-bn-groups", "1"]])
def test_pretrain_moco_runs_two_steps(extra: list[str], phantom_store, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "moco", "--queue-size", "16", *extra,
            "--out", str(run), *tiny_pretrain(*tiny_sets()), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [dict(zip(header, row.split(","))) for row in rows[1:] if row.startswith("step")]
    assert len(steps) == 2 and all(math.isfinite(float(row["part_moco"])) for row in steps)
    assert (run / "encoder.safetensors").is_file()
