"""A ResNet stem's max-pool on the CPU: torch's NCHW kernel against `sonocl.backbones.StemMaxPool`.

`StemMaxPool` pools in channels-last memory where no gradient flows through it (the held-out loss, the monitors,
evaluation features) and leaves training to torch's own kernel. This measures, in interleaved rounds, the pool alone
(``(batch, 64, size/2, size/2)``, the stem's output) without a gradient and with one (forward and backward), and a
whole ResNet-18 forward without a gradient, each with torch's ``nn.MaxPool2d`` and with `StemMaxPool`; medians in ms.

    .venv/bin/python benchmarks/stem_pool.py [--size 64 --batch-size 46 --rounds 30 --threads 2]

Writes ``benchmarks/out/stem_pool.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sonocl.backbones import Backbone, StemMaxPool


def _pooled_with_gradient(pool: nn.Module, stem: torch.Tensor, weights: torch.Tensor) -> None:
    (pool(stem) * weights).sum().backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=46, help="46: the USCL POCUS run's held-out batch (23 pairs)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = Backbone.named("resnet18").build(3).eval()
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(images)))
    trained = stem.clone().requires_grad_()
    weights = torch.randn_like(model.maxpool(stem))
    pools = {"torch": nn.MaxPool2d(kernel_size=3, stride=2, padding=1), "sonocl": StemMaxPool(3, 2, 1)}

    def forward(name: str) -> None:
        model.maxpool = pools[name]
        model(images)

    cases: dict[str, Callable[[str], object]] = {
        "pool, no gradient": lambda name: pools[name](stem),
        "pool, forward and backward": lambda name: _pooled_with_gradient(pools[name], trained, weights),
        "resnet18 forward, no gradient": forward,
    }
    times: dict[str, dict[str, list[float]]] = {case: {name: [] for name in pools} for case in cases}
    for round_index in range(args.rounds + 3):  # the first three rounds warm up
        for case, run in cases.items():
            for name in pools:
                with torch.set_grad_enabled("backward" in case):
                    started = time.perf_counter()
                    run(name)
                    elapsed = time.perf_counter() - started
                if round_index >= 3:
                    times[case][name].append(elapsed * 1000)

    results = {case: {name: statistics.median(values) for name, values in by_pool.items()} for case, by_pool in
               times.items()}  # fmt: skip
    for case, by_pool in results.items():
        print(f"{case:32s} torch {by_pool['torch']:7.2f} ms  sonocl {by_pool['sonocl']:7.2f} ms  "
              f"({by_pool['torch'] / by_pool['sonocl']:.2f}x)")  # fmt: skip
    out = Path(__file__).resolve().parent / "out" / "stem_pool.json"
    out.parent.mkdir(exist_ok=True)
    record = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, **vars(args),
              "median_ms": results}  # fmt: skip
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
