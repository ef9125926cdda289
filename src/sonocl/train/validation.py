"""The held-out checks at the end of an epoch: the validation loss (model selection) and the monitors (kNN
accuracy, collapse), each in eval mode on its own fixed-seed draw, never touching the training state."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sonocl.augment import make_views
from sonocl.methods.objectives import BatchTensors
from sonocl.train.data import VALIDATION_SEED
from sonocl.train.monitor import backbone_features, embedding_std, knn_accuracy
from sonocl.train.run import HeldOutViews, Run

HELD_OUT_VIEWS_BYTES = 256 * 2**20
"""Held-out views up to this size are made once and kept (`Run.held_out_views`): they are the same at every epoch
(fixed seed). Larger sets (at 224 px, thousands of held-out videos) are made again at every epoch instead."""


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """The unweighted loss of the held-out pairs (eval mode, fixed seed); None without held-out pairs."""
    if not run.data.val_batches:
        return None
    model, device, dtype = run.model, run.device, run.autocast_dtype
    model.eval()
    total, count = 0.0, 0
    for view1, view2, targets in _held_out_views(run):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = run.objective.validation_loss(model, view1, view2, targets)
        total += float(loss) * len(targets.weight)
        count += len(targets.weight)
    return total / count


def _held_out_views(run: Run) -> Iterator[HeldOutViews]:
    """Each held-out batch's two views and targets, drawn from the validation seed; kept in `Run.held_out_views` by
    the first call when they fit in `HELD_OUT_VIEWS_BYTES`, and read from there by the later calls."""
    if run.held_out_views is not None:
        yield from run.held_out_views
        return
    data, device = run.data, run.device
    generator = torch.Generator(device=device).manual_seed(run.cfg.seed + VALIDATION_SEED)
    kept: list[HeldOutViews] | None = []
    size = 0
    for batch in data.val_batches:
        frames = torch.from_numpy(data.store.gather(batch.frames)).to(device)
        view1, view2 = make_views(frames, batch.mix, batch.augment_first, run.augment, generator)
        views = (
            view1.contiguous(memory_format=run.memory_format),
            view2.contiguous(memory_format=run.memory_format),
            BatchTensors(
                positive_group=torch.from_numpy(batch.positive_group).to(device),
                weight=torch.ones(len(batch), device=device),
                label=torch.from_numpy(batch.label).to(device),
            ),
        )
        size += views[0].nbytes + views[1].nbytes
        if kept is not None and size <= HELD_OUT_VIEWS_BYTES:
            kept.append(views)
        else:
            kept = None
        yield views
    run.held_out_views = kept


@torch.no_grad()
def monitors(run: Run) -> dict[str, float]:
    """The kNN accuracy and the collapse metric (eval mode); the held-out loss is `validation_loss`."""
    cfg, data, model, device = run.cfg, run.data, run.model, run.device
    model.eval()
    metrics: dict[str, float] = {}
    dtype = run.autocast_dtype

    def features(frames: np.ndarray) -> Tensor:
        return backbone_features(model.backbone, data.store, frames, size=cfg.size, mean=cfg.augment.mean,
                                 std=cfg.augment.std, channels=cfg.model.channels, device=device,
                                 memory_format=run.memory_format, autocast_dtype=dtype)  # fmt: skip

    # Each distinct frame once: the collapse frames are usually the held-out labelled frames, the kNN queries.
    (bank_frames, bank_labels), (query_frames, query_labels), collapse = data.bank, data.query, data.collapse_frames
    wanted = np.concatenate([collapse, bank_frames, query_frames])
    if not len(wanted):
        return metrics
    distinct, where = np.unique(wanted, return_inverse=True)
    h = features(distinct)[torch.from_numpy(where)]
    collapse_h, bank_h, query_h = torch.split(h, [len(collapse), len(bank_frames), len(query_frames)])
    if len(collapse) >= 2:
        metrics["embedding_std"] = embedding_std(model.projector(collapse_h.to(device)).float())
    if len(bank_frames) and len(query_frames):
        metrics["knn_acc"] = knn_accuracy(
            bank_h, torch.from_numpy(bank_labels), query_h, torch.from_numpy(query_labels), k=cfg.knn_k
        )
    return metrics
