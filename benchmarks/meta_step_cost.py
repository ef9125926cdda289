"""Benchmark 2: the cost of a Meta-USCL training step relative to a plain USCL step (issue 3).

A full step is the objective's forward (for Meta-USCL: the bilevel meta step on a meta batch, then the
weighted loss), backward, the SGD step and ``after_step``, on random tensors already in memory (no data
path). USCL, Meta-USCL with a meta step every step, and Meta-USCL with ``--meta-every K`` (K consecutive
steps, one of them a meta step) are interleaved in each repeat so that load on the shared machine hits all
three alike; the figures are medians over repeats. Targets (issue 13): ≤ 3× per step, ≤ 1.4× with
``--meta-every 5`` (the reference code reports 6.58 s vs 0.097 s, 68×). ``--phases`` also times the meta step's
parts (g, the meta batch's forward and backward, the hypergradient's JVP), each against a USCL step.

    .venv/bin/python benchmarks/meta_step_cost.py --sizes 64 112 --repeats 5 [--phases]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sonocl.methods import get_method
from sonocl.methods.objectives import BatchTensors, StepContext
from sonocl.models import ContrastiveModel, build_backbone
from sonocl.runtime import keep_freed_memory
from sonocl.train.config import merge, preset
from sonocl.train.model import AUTOCAST_DTYPES


def _setup(
    method: str, size: int, batch: int, meta_every: int, seed: int, device: torch.device, autocast: torch.dtype | None
):
    torch.manual_seed(seed)
    model = ContrastiveModel(
        build_backbone("resnet18", 1),
        512,
        projection_hidden=512,
        projection_dim=128,
        num_classes=12 if method == "uscl" else 0,
    ).to(device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # as the training loop
    model.to(memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    cfg = merge(preset(method), {"options": {"meta_every": meta_every}} if method == "meta-uscl" else {})
    objective = get_method(method).objective(cfg, model, None)  # uscl and meta-uscl read nothing of the sampler
    objective.to(device)
    views = [torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=layout) for _ in range(4)]
    labels = torch.randint(-1, 12, (batch,), device=device)
    tensors = BatchTensors(torch.arange(batch, device=device), torch.ones(batch, device=device), labels)
    return {
        "model": model,
        "optimizer": optimizer,
        "objective": objective,
        "views": views,
        "batch": tensors,
        "step": 0,
        "device": device,
        "autocast": autocast,
    }


def _train_steps(state: dict, count: int) -> float:
    """Seconds for ``count`` consecutive full training steps."""
    model, optimizer, objective, views = state["model"], state["optimizer"], state["objective"], state["views"]
    device, dtype = state["device"], state["autocast"]
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        context = StepContext(
            step=state["step"],
            optimizer=optimizer,
            lr=0.1,
            meta_views=lambda: (views[2], views[3], state["batch"].positive_group),
        )
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = objective(model, views[0], views[1], state["batch"], context)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step(model)
        state["step"] += 1
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PHASES = {
    "_weighted_gradient": "g: backward of the weighted loss at θ",
    "_meta_loss_gradient": "meta batch: forward and backward at θ'",
    "_cmw_hypergradient": "hypergradient: forward-mode JVP of the training views, then ∂/∂α",
}
"""The parts of the meta step `--phases` times (functions of `sonocl.methods.meta_step`); the rest of a Meta-USCL
step is the real forward, backward and SGD step, which a USCL step also has."""


@contextlib.contextmanager
def phase_timers(device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Time each call of the `PHASES` functions (device-synchronised) while the block runs."""
    from sonocl.methods import meta_step

    times: dict[str, list[float]] = {name: [] for name in PHASES}
    originals = {name: getattr(meta_step, name) for name in PHASES}

    def timed(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            _synchronize(device)
            start = time.perf_counter()
            out = originals[name](*args, **kwargs)
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            return out

        return call

    for name in PHASES:
        setattr(meta_step, name, timed(name))
    try:
        yield times
    finally:
        for name, original in originals.items():
            setattr(meta_step, name, original)


def measure(
    size: int,
    batch: int,
    repeats: int,
    meta_every: int,
    device: torch.device,
    autocast: torch.dtype | None,
    phases: bool = False,
) -> dict:
    uscl = _setup("uscl", size, batch, 1, 0, device, autocast)
    meta = _setup("meta-uscl", size, batch, 1, 0, device, autocast)
    meta_k = _setup("meta-uscl", size, batch, meta_every, 0, device, autocast)
    for state in (uscl, meta):  # warm-up (allocator, one-time initialisation)
        _train_steps(state, 1)
    _train_steps(meta_k, meta_every)
    times: dict[str, list[float]] = {"uscl": [], "meta_uscl": [], f"meta_uscl_every_{meta_every}": []}
    phase_times: dict[str, list[float]] = {name: [] for name in PHASES}
    for _ in range(repeats):
        times["uscl"].append(_train_steps(uscl, 1))
        with phase_timers(device) if phases else contextlib.nullcontext({}) as timed:
            times["meta_uscl"].append(_train_steps(meta, 1))
        for name, seconds in timed.items():
            phase_times[name] += seconds
        times[f"meta_uscl_every_{meta_every}"].append(_train_steps(meta_k, meta_every) / meta_every)
        print(f"size {size}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    # Ratios per repeat (each from one interleaved round) and of the medians.
    per_round = [m / u for m, u in zip(times["meta_uscl"], times["uscl"])]
    per_round_k = [m / u for m, u in zip(times[f"meta_uscl_every_{meta_every}"], times["uscl"])]
    uscl_median = medians["uscl"]
    breakdown = {
        PHASES[name]: {"seconds": statistics.median(v), "x_uscl_step": statistics.median(v) / uscl_median}
        for name, v in phase_times.items()
        if v
    }
    return {
        "meta_step_phases": breakdown,
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "meta_every": meta_every,
        "seconds_per_step": times,
        "median_seconds_per_step": medians,
        "images_per_s": {name: 2 * batch / seconds for name, seconds in medians.items()},  # two views per pair
        "ratio_meta_every_1": medians["meta_uscl"] / medians["uscl"],
        f"ratio_meta_every_{meta_every}": medians[f"meta_uscl_every_{meta_every}"] / medians["uscl"],
        "ratio_meta_every_1_median_of_rounds": statistics.median(per_round),
        f"ratio_meta_every_{meta_every}_median_of_rounds": statistics.median(per_round_k),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meta-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N (benchmark 4: cuda --precision bf16 --sizes 224)"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--phases", action="store_true", help="also time the parts of the meta step (synchronised)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "meta_step_cost.json")
    args = parser.parse_args()
    keep_freed_memory()  # as the sonocl command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for size in args.sizes:
        autocast = AUTOCAST_DTYPES.get(args.precision)
        result = measure(size, args.batch, args.repeats, args.meta_every, device, autocast, args.phases)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_step"}, indent=1))
    report = {
        "benchmark": "meta_step_cost",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "precision": args.precision,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
