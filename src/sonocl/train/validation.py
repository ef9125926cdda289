"""The held-out checks at the end of an epoch: the validation loss (model selection) and the monitors (kNN
accuracy, collapse), each in eval mode on its own fixed-seed draw, never touching the training state."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sonocl.augment import make_views
from sonocl.methods.objectives import BatchTensors
from sonocl.train.data import VALIDATION_SEED
from sonocl.train.monitor import backbone_features, embedding_std, knn_accuracy
from sonocl.train.run import Run


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """The unweighted loss of the held-out pairs (eval mode, fixed seed); None without held-out pairs."""
    cfg, data, model, device = run.cfg, run.data, run.model, run.device
    if not data.val_batches:
        return None
    model.eval()
    dtype = run.autocast_dtype
    generator = torch.Generator(device=device).manual_seed(cfg.seed + VALIDATION_SEED)
    total, count = 0.0, 0
    for batch in data.val_batches:
        frames = torch.from_numpy(data.store.gather(batch.frames)).to(device)
        view1, view2 = make_views(frames, batch.mix, batch.augment_first, run.augment, generator)
        targets = BatchTensors(
            positive_group=torch.from_numpy(batch.positive_group).to(device),
            weight=torch.ones(len(batch), device=device),
            label=torch.from_numpy(batch.label).to(device),
        )
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = run.objective.validation_loss(
                model,
                view1.contiguous(memory_format=run.memory_format),
                view2.contiguous(memory_format=run.memory_format),
                targets,
            )
        total += float(loss) * len(batch)
        count += len(batch)
    return total / count


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
