"""Training monitors, logged and never part of the loss: an online kNN classifier and a collapse metric.

- kNN (solo-learn / DINO style): backbone features h of unaugmented frames of the labelled training
  videos are the bank, frames of the labelled held-out videos the queries; cosine similarity, the k
  nearest vote with weight ``exp(sim / 0.07)``; accuracy per frame.
- Collapse: ``std`` over the batch of the L2-normalised projections z, averaged over dimensions, times
  ``sqrt(D)`` (lightly's ``std_of_l2_normalized``): about 1 for well spread embeddings, 0 when collapsed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonocl.data.store import VideoTable


def embedding_std(z: Tensor) -> float:
    """Collapse metric of projections ``z`` ``(N, D)``: ``mean_d std_n(z / ‖z‖) · sqrt(D)``."""
    if z.shape[0] < 2:
        return float("nan")
    normalised = F.normalize(z.float(), dim=1)
    return float(normalised.std(dim=0).mean() * math.sqrt(z.shape[1]))


def monitor_frames(
    store: VideoTable, videos: np.ndarray, codes: np.ndarray, per_video: int
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_video`` evenly spaced frames of each labelled video in ``videos``, and their labels."""
    frames, labels = [], []
    for video in videos:
        if codes[video] < 0:
            continue
        start, stop = int(store.video_offsets[video]), int(store.video_offsets[video + 1])
        picks = np.unique(np.linspace(start, stop - 1, num=min(per_video, stop - start)).round().astype(np.int64))
        frames.append(picks)
        labels.append(np.full(len(picks), codes[video], dtype=np.int64))
    if not frames:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(frames), np.concatenate(labels)


@torch.no_grad()
def backbone_features(
    backbone: nn.Module,
    store: VideoTable,
    frame_indices: np.ndarray,
    size: int,
    mean: float,
    std: float,
    channels: int,
    device: torch.device,
    batch_size: int = 128,
    memory_format: torch.memory_format = torch.contiguous_format,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """``(N, F)`` float32 CPU features of the frames, resized to ``size`` and normalised, the backbone in eval mode."""
    from sonocl.augment import resize_to

    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for start in range(0, len(frame_indices), batch_size):
            frames = torch.from_numpy(store.gather(frame_indices[start : start + batch_size])).to(device)
            images = (resize_to(frames, size) - mean) / std
            if channels == 3:
                images = images.expand(-1, 3, -1, -1)
            images = images.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                features = backbone(images).flatten(1)
            out.append(features.float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, query: Tensor, query_labels: Tensor, k: int = 20, temperature: float = 0.07
) -> float:
    """Weighted kNN accuracy (cosine similarity, votes ``exp(sim/T)``) of ``query`` against ``bank``."""
    if len(bank) == 0 or len(query) == 0:
        return float("nan")
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    classes = int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(query), 1024):
        similarity = query[start : start + 1024] @ bank.T
        top_sim, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), classes)
        votes.scatter_add_(1, bank_labels[top_index], torch.exp(top_sim / temperature))
        correct += int((votes.argmax(dim=1) == query_labels[start : start + 1024]).sum())
    return correct / len(query)
