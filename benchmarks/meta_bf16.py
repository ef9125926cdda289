"""Issue 10: the CMW-Net hypergradient of Meta-USCL's meta step under bf16 autocast against fp32.

Per seed: a ResNet-18 (1-channel stem) in train mode, random views and meta views, one SGD step taken first so
the optimizer has momentum buffers; on the same state the meta step runs without autocast (fp32), then under bf16
autocast with the real forward inside it, as the training loop calls it: ``raw`` is the step computed in bf16
(`sonocl.methods.meta_step._meta_gradient` on the bf16 forward, what `cmw_meta_gradient` did before issue 10), ``shipped``
is `cmw_meta_gradient` itself (float32 inside autocast). Prints the cosine similarity and relative L2 error of the
flattened CMW-Net gradient against fp32, and the meta losses. CPU autocast (no GPU needed); seconds per seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/meta_bf16.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import torch

from sonocl.losses import GroupInfoNCE
from sonocl.methods import meta_step
from sonocl.models import CMWNet, ContrastiveModel, build_backbone


def _hypergradient(model, cmw, optimizer, views, dtype: torch.dtype | None, raw: bool) -> tuple[torch.Tensor, float]:
    batch, group, loss = views[0].shape[0], torch.arange(views[0].shape[0]), GroupInfoNCE(0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        h1, z1 = model(views[0])
        h2, z2 = model(views[1])
        if raw:
            params = {name: p for name, p in model.named_parameters() if p.requires_grad}
            result = meta_step._meta_gradient(
                model, params, cmw, loss, (views[0], views[1]), (h1, h2), (z1, z2), group, torch.ones(batch),
                (views[2], views[3]), optimizer, None, group, None,
            )  # fmt: skip
        else:
            result = meta_step.cmw_meta_gradient(
                model, cmw, loss, views[0], views[1], h1, h2, z1, z2, group, torch.ones(batch), views[2], views[3],
                optimizer, meta_positive_group=group,
            )  # fmt: skip
    model.load_state_dict(state)  # the real forwards moved the batch-norm statistics
    return torch.cat([g.float().flatten() for g in result.cmw_grads]), float(result.meta_loss)


def _compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    cosine = float(torch.nn.functional.cosine_similarity(reference, other, dim=0))
    return cosine, float((other - reference).norm() / reference.norm())


def measure(seed: int, size: int, batch: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = ContrastiveModel(build_backbone("resnet18", 1), 512, projection_hidden=512, projection_dim=128).train()
    cmw = CMWNet(512)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    views = [torch.randn(batch, 1, size, size) for _ in range(4)]
    _, z1 = model(views[2])
    _, z2 = model(views[3])
    GroupInfoNCE(0.5)(z1, z2).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fp32, meta32 = _hypergradient(model, cmw, optimizer, views, None, raw=False)
    raw, meta_raw = _hypergradient(model, cmw, optimizer, views, torch.bfloat16, raw=True)
    shipped, meta_shipped = _hypergradient(model, cmw, optimizer, views, torch.bfloat16, raw=False)
    (raw_cosine, raw_error), (shipped_cosine, shipped_error) = _compare(fp32, raw), _compare(fp32, shipped)
    return {
        "seed": seed,
        "raw_cosine": raw_cosine,
        "raw_relative_l2": raw_error,
        "shipped_cosine": shipped_cosine,
        "shipped_relative_l2": shipped_error,
        "meta_loss_fp32": meta32,
        "meta_loss_raw": meta_raw,
        "meta_loss_shipped": meta_shipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        row = measure(seed, args.size, args.batch)
        print(", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
