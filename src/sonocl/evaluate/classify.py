"""Grouped k-fold classification of a frame store: linear probe, last-block and full fine-tuning, kNN.

One evaluation = for each init, for each seed, for each fold of a stratified split grouped by video (or by the
store's group id): train on the training videos, predict every sampled frame of the test videos. Frames are
sampled at ``fps`` (real timestamps), at most ``frames_per_video`` per video, loaded once and resized once to
the evaluation size (uint8 in memory). Training augmentation is the papers' fine-tuning transform
(RandomResizedCrop(size, 0.8–1, 0.8–1.25) + horizontal flip, `sonocl.augment`); test frames are only normalised.

Protocols (`PROTOCOLS`):

- ``linear``: frozen encoder in eval mode, features extracted once per fold, a new Linear head trained on them.
- ``last-block``: the USCL / Meta-USCL protocol ("fine-tune the last 3 layers", methods.md §1.8/§2.9): only
  ``layer4[-1]`` and a new Linear head are trainable. The frozen part runs without autograd but, as in the
  papers, in train mode so its BatchNorm running statistics still update (``freeze_bn=True`` keeps them fixed).
- ``full``: every parameter trainable.
- ``knn``: cosine-similarity-weighted vote of the ``knn_k`` nearest training frames on frozen features.

Model selection (`SELECTIONS`): ``last`` epoch (default); ``inner-val``: a grouped hold-out of the training
videos, the epoch with the best frame-level balanced accuracy on it (latest among ties) is reported;
``max-test``: the papers' way, the epoch with the best frame-level test accuracy of each fold — optimistic,
and labelled so in every output (methods.md §6, quirk 1). The test fold is predicted after every epoch only for
``max-test`` or ``test_every_epoch`` (the diagnostic curve); ``inner-val`` snapshots the model at its selected
epoch and predicts the test fold once.

On the CPU, `FineTuneModel.optimise_for_cpu` picks the memory layout per stage and computes the convs of trainable
stages on tiny maps as GEMMs (`GemmConv2d`): same parameters and results up to float rounding, about 1.5×
less CPU time per last-block epoch at 64 px (docs/evaluate.md, Cost).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sonocl.augment import AugmentConfig, BatchAugment, resize_to
from sonocl.data.store import FrameStore
from sonocl.errors import ConfigError
from sonocl.progress import Progress, progress_report
from sonocl.workers import map_unordered
from sonocl.evaluate.inits import InitReport
from sonocl.evaluate.metrics import classification_metrics, pooled_metrics, summarize, video_level

PROTOCOLS = ("linear", "last-block", "full", "knn")
SELECTIONS = ("last", "inner-val", "max-test")
GROUP_BY = ("video", "group")
"""``group``: the store's group ids (patients, from DICOM PatientID or a CSV group column) stay in one fold."""
OPTIMISTIC = "optimistic (selected on the test fold)"
SCHEMA = "sonocl.evaluate/1"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimisation and input settings of a fine-tuning recipe (Adam, cosine schedule over the epochs)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    size: int
    mean: float
    std: float


RECIPES: dict[str, Recipe] = {
    # USCL eval_pretrained_model.py (methods.md §1.8)
    "uscl": Recipe(epochs=100, batch_size=32, lr=0.01, weight_decay=1e-4, size=224, mean=0.5, std=0.25),
    # Meta-USCL eval_pretrained_model_on_POCUS/train.py (§2.9); 64 or 224 px
    "meta-uscl": Recipe(epochs=30, batch_size=128, lr=0.01, weight_decay=1e-4, size=64, mean=0.18, std=0.24),
}


@dataclasses.dataclass
class EvalConfig:
    """Everything that defines an evaluation besides the store and the inits (saved in results.json)."""

    protocol: str = "last-block"
    recipe: str = "meta-uscl"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 1e-4
    size: int = 64
    mean: float = 0.18
    std: float = 0.24
    channels: int = 1
    backbone: str = "resnet18"
    folds: int = 5
    seeds: int = 1
    seed: int = 0
    group_by: str = "video"
    fps: float = 3.0
    """Frame sampling rate from the store's timestamps; 0 = every frame."""
    frames_per_video: int = 30
    """At most this many sampled frames per video (the first ones); 0 = no limit."""
    selection: str = "last"
    test_every_epoch: bool = False
    """Predict the test fold after every epoch for the diagnostic curve (implied by ``selection="max-test"``)."""
    freeze_bn: bool = False
    knn_k: int = 20
    full_backbone_lr_scale: float = 0.1
    """``full``: the backbone's LR is this share of the head's (Adam 0.01 on every layer erases what pretraining
    brought; the 10× rule of fine-tuning practice). The papers' last-block protocol trains layer4[-1] at the head's."""
    linear_augment: bool = False
    inner_val_fraction: float = 0.2
    classes: tuple[str, ...] | None = None
    label_column: str = "label"
    device: str = "auto"

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> EvalConfig:
        """The recipe's values, then every override that is not None."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        values = dataclasses.asdict(RECIPES[recipe])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(recipe=recipe, **values)

    def __post_init__(self) -> None:
        checks = {
            f"protocol in {PROTOCOLS}": self.protocol in PROTOCOLS,
            f"selection in {SELECTIONS}": self.selection in SELECTIONS,
            f"group_by in {GROUP_BY}": self.group_by in GROUP_BY,
            "folds ≥ 2": self.folds >= 2,
            "seeds ≥ 1": self.seeds >= 1,
            "epochs ≥ 1": self.epochs >= 1,
            "batch_size ≥ 2": self.batch_size >= 2,
            "size ≥ 16": self.size >= 16,
            "channels 1 or 3": self.channels in (1, 3),
            "fps ≥ 0": self.fps >= 0,
            "frames_per_video ≥ 0": self.frames_per_video >= 0,
            "knn_k ≥ 1": self.knn_k >= 1,
            "0 < full_backbone_lr_scale ≤ 1": 0 < self.full_backbone_lr_scale <= 1,
            "0 < inner_val_fraction < 1": 0 < self.inner_val_fraction < 1,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ConfigError(f"invalid evaluation settings: {', '.join(failed)}")
        if self.protocol == "knn" and self.selection != "last":
            raise ConfigError("knn has no epochs to select: use --selection last")


class FineTuneDivergedError(ConfigError):
    """The fine-tuning loss became NaN or infinite: the recipe's LR is too high for this encoder."""


# ----------------------------------------------------------------------------------------------------- data


def sample_frames(timestamps: np.ndarray, fps: float, max_frames: int) -> np.ndarray:
    """Positions of the frames nearest to the times t0, t0 + 1/fps, … (duplicates dropped), the first ``max_frames``.

    ``fps = 0`` keeps every frame; ``max_frames = 0`` keeps all the sampled ones. A still image gives ``[0]``.
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if fps > 0 and len(timestamps) > 1:
        targets = np.arange(timestamps[0], timestamps[-1] + 0.5 / fps, 1.0 / fps)
        right = np.clip(np.searchsorted(timestamps, targets), 1, len(timestamps) - 1)
        left = right - 1
        nearest = np.where(targets - timestamps[left] <= timestamps[right] - targets, left, right)
        positions = np.unique(nearest)
    else:
        positions = np.arange(len(timestamps))
    return positions[:max_frames] if max_frames > 0 else positions


@dataclasses.dataclass
class EvalData:
    """The sampled frames of the evaluated videos, resized once, and their video table."""

    images: torch.Tensor
    """``(N, 1, size, size)`` uint8 frames."""
    frame_video: np.ndarray
    """``(N,)`` index into the evaluated videos (not the store's)."""
    frame_index: np.ndarray
    """``(N,)`` position of the frame within its video in the store."""
    video_ids: list[str]
    video_hashes: list[str]
    """Content hash of each evaluated video (matched against a pretraining run's provenance)."""
    video_labels: np.ndarray
    video_groups: np.ndarray
    class_names: list[str]

    @property
    def frame_labels(self) -> np.ndarray:
        return self.video_labels[self.frame_video]

    def frames_of(self, videos: np.ndarray) -> np.ndarray:
        """Frame indices (into ``images``) of the given evaluated videos."""
        return np.flatnonzero(np.isin(self.frame_video, videos))


def load_eval_data(store: FrameStore, config: EvalConfig) -> EvalData:
    """Labelled videos of ``store`` (only ``config.classes`` if given, in that order), frames sampled and resized."""
    values = store.label_column(config.label_column)
    present = sorted({v for v in values if v})
    if config.classes:
        unknown = [c for c in config.classes if c not in present]
        if unknown:
            raise ConfigError(f"{store.root}: no videos labelled {unknown} in column {config.label_column!r}; labels are {present}")
        class_names = list(config.classes)
    else:
        class_names = present
    if len(class_names) < 2:
        raise ConfigError(f"{store.root}: need at least 2 classes in column {config.label_column!r}, found {class_names}")
    lookup = {name: code for code, name in enumerate(class_names)}
    kept = [v for v, value in enumerate(values) if value in lookup]
    groups = store.group_codes()
    frame_video, frame_index, global_index = [], [], []
    for position, v in enumerate(kept):
        start, stop = store.video_offsets[v], store.video_offsets[v + 1]
        chosen = sample_frames(store.frame_time[start:stop], config.fps, config.frames_per_video)
        frame_video.append(np.full(len(chosen), position, dtype=np.int64))
        frame_index.append(chosen)
        global_index.append(start + chosen)
    indices = np.concatenate(global_index)
    images = torch.empty((len(indices), 1, config.size, config.size), dtype=torch.uint8)
    for begin in range(0, len(indices), 512):
        chunk = torch.from_numpy(store.gather(indices[begin : begin + 512]))
        images[begin : begin + len(chunk)] = resize_to(chunk, config.size).mul_(255.0).round_().to(torch.uint8)
    return EvalData(
        images=images,
        frame_video=np.concatenate(frame_video),
        frame_index=np.concatenate(frame_index).astype(np.int64),
        video_ids=[store.videos[v].id for v in kept],
        video_hashes=[store.videos[v].content_hash for v in kept],
        video_labels=np.array([lookup[values[v]] for v in kept], dtype=np.int64),
        video_groups=groups[kept],
        class_names=class_names,
    )


# ---------------------------------------------------------------------------------------------- splitting


def has_patient_groups(store: FrameStore) -> bool:
    """Whether the store's group ids are real groups (patients or sources) rather than one id per video."""
    return any(video.group != video.id for video in store.videos)


def check_disjoint(train: np.ndarray, test: np.ndarray, data: EvalData, by_group: bool) -> None:
    """Raise if a video (or, grouping by group, a group) is in both the training and the test videos of a fold."""
    shared = np.intersect1d(train, test)
    if shared.size:
        raise AssertionError(f"videos in both train and test of a fold: {[data.video_ids[v] for v in shared[:5]]}")
    if by_group:
        shared_groups = np.intersect1d(data.video_groups[train], data.video_groups[test])
        if shared_groups.size:
            raise AssertionError(f"groups in both train and test of a fold: {shared_groups[:5].tolist()}")


def fold_splits(data: EvalData, config: EvalConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over the evaluated videos, grouped by video or by group id; checked disjoint."""
    from sonocl.data.splits import grouped_stratified_kfold

    groups = data.video_groups if config.group_by == "group" else np.arange(len(data.video_ids))
    folds = grouped_stratified_kfold(data.video_labels, groups, config.folds, seed)
    for train, test in folds:
        check_disjoint(np.asarray(train), np.asarray(test), data, config.group_by == "group")
    return [(np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)) for train, test in folds]


def inner_validation(data: EvalData, train: np.ndarray, config: EvalConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training videos of a fold into (fit, validation) videos, grouped as the folds are."""
    from sonocl.data.splits import grouped_holdout

    groups = data.video_groups[train] if config.group_by == "group" else train
    kept, held = grouped_holdout(data.video_labels[train], groups, config.inner_val_fraction, seed)
    fit, val = train[np.asarray(kept, dtype=np.int64)], train[np.asarray(held, dtype=np.int64)]
    check_disjoint(fit, val, data, config.group_by == "group")
    return fit, val


def select_epoch(selection: str, test_scores: Sequence[float] | None, val_scores: Sequence[float] | None) -> int:
    """Index of the reported epoch: ``last``; ``inner-val`` the best validation score (latest among ties);
    ``max-test`` the best test score (earliest among ties)."""
    if selection == "last":
        scores = test_scores if test_scores is not None else val_scores
        if scores is None:
            raise ValueError("selection 'last' needs the per-epoch scores to count the epochs")
        return len(scores) - 1
    scores = val_scores if selection == "inner-val" else test_scores
    if scores is None:
        raise ValueError(f"selection {selection!r} needs its per-epoch scores")
    values = np.asarray(scores, dtype=np.float64)
    return int(len(values) - 1 - np.argmax(values[::-1])) if selection == "inner-val" else int(np.argmax(values))


# -------------------------------------------------------------------------------------------------- models


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device; use --device auto or cpu")
    return device


TINY_MAP = 4
"""Feature maps of at most this many pixels a side run in NCHW layout and, when trained on the CPU, as GEMM convs."""


def _stages(backbone: torchvision.models.ResNet) -> list[tuple[nn.Module, int]]:
    """The backbone's modules in forward order, each with the stride of its output relative to the input image."""
    return [(backbone.conv1, 2), (backbone.bn1, 2), (backbone.relu, 2), (backbone.maxpool, 4), (backbone.layer1, 4),
            (backbone.layer2, 8), (backbone.layer3, 16), *[(block, 32) for block in backbone.layer4]]


class GemmConv2d(nn.Conv2d):
    """A convolution computed as one im2col matrix product, with the same parameters and result as ``nn.Conv2d``.

    On the CPU, oneDNN's kernels (above all its backward) are 1.5–3× slower on the 2×2 maps of ``layer4`` at
    64 px than MKL's GEMM on the same product (docs/evaluate.md, Cost); the unfolded input is small there.
    """

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> GemmConv2d:
        """A GemmConv2d using ``conv``'s own weight and bias tensors (same Parameters: optimiser and state unchanged)."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"GemmConv2d needs groups=1, numeric zero padding: {conv}")
        gemm = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   bias=conv.bias is not None, device="meta")
        gemm.weight, gemm.bias = conv.weight, conv.bias
        return gemm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        out_h, out_w = (
            (side + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for side, pad, dil, k, stride in zip((height, width), self.padding, self.dilation, self.kernel_size, self.stride)
        )
        columns = F.unfold(images, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C·kh·kw, L)
        out = columns.transpose(1, 2).reshape(n * out_h * out_w, -1) @ self.weight.flatten(1).T  # one (N·L, O) GEMM
        if self.bias is not None:
            out = out + self.bias
        return out.view(n, out_h * out_w, -1).transpose(1, 2).reshape(n, -1, out_h, out_w)


def _use_gemm_convs(module: nn.Module) -> None:
    """Replace every Conv2d inside ``module`` by a `GemmConv2d` sharing its parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, GemmConv2d.sharing(child))
        else:
            _use_gemm_convs(child)


class _ContiguousLayout(nn.Module):
    """Switches activations from channels-last to NCHW (where the small feature maps begin)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous()


class FineTuneModel(nn.Module):
    """A backbone split into a frozen part (run without autograd) and a trainable part, plus a new Linear head."""

    def __init__(self, backbone: torchvision.models.ResNet, num_classes: int, protocol: str, freeze_bn: bool) -> None:
        super().__init__()
        modules, strides = zip(*_stages(backbone))
        split = {"full": 0, "last-block": len(modules) - 1}.get(protocol, len(modules))  # linear, knn: all frozen
        pool = [backbone.avgpool, nn.Flatten(1)]
        self.frozen = nn.Sequential(*modules[:split], *(pool if split == len(modules) else []))
        self.trainable = nn.Sequential(*modules[split:], *(pool if split < len(modules) else []))
        self.frozen.requires_grad_(False)
        self.freeze_bn = freeze_bn or protocol in ("linear", "knn")
        self.head = nn.Linear(_feature_dim(backbone), num_classes)
        self._strides = strides

    def optimise_for_cpu(self, size: int) -> FineTuneModel:
        """Channels-last layout for the large early maps, NCHW from the first stage whose output is ≤ `TINY_MAP` px a
        side, and GEMM convs in the trainable stages on such maps.

        Measured on a 2-core Xeon (AVX-512) at 64 px, last-block: channels-last is faster up to ``layer2`` but about
        2× slower on the 4×4 and 2×2 maps of ``layer3``/``layer4``, where `GemmConv2d` also beats oneDNN's backward.
        Only the kernels change: same parameters, same results up to float rounding.
        """
        self.to(memory_format=torch.channels_last)
        first = next((i for i, stride in enumerate(self._strides) if math.ceil(size / stride) <= TINY_MAP), None)
        if first is None:
            return self
        frozen, trainable = list(self.frozen), list(self.trainable)
        for module in [*frozen, *trainable][first:]:
            module.to(memory_format=torch.contiguous_format)
        if first < len(frozen):
            self.frozen = nn.Sequential(*frozen[:first], _ContiguousLayout(), *frozen[first:])
            tiny_trainable = trainable
        else:
            start = first - len(frozen)
            self.trainable = nn.Sequential(*trainable[:start], _ContiguousLayout(), *trainable[start:])
            tiny_trainable = trainable[start:]
        for module in tiny_trainable:
            _use_gemm_convs(module)
        return self

    def train(self, mode: bool = True) -> FineTuneModel:
        super().train(mode)
        if mode and self.freeze_bn:
            self.frozen.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.frozen(images)
        return self.trainable(hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _feature_dim(backbone: torchvision.models.ResNet) -> int:
    block = backbone.layer4[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.num_features)


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class FoldOutcome:
    """Predictions of one fold: test probabilities of the reported epoch and the per-epoch scores recorded."""

    test_probabilities: np.ndarray
    selected_epoch: int
    """1-based; 0 for knn."""
    test_accuracy: list[float] | None
    val_balanced_accuracy: list[float] | None


class FoldTrainer:
    """Trains and predicts one fold of one init with one protocol."""

    def __init__(self, data: EvalData, config: EvalConfig, device: torch.device, generator: torch.Generator) -> None:
        self.data, self.config, self.device, self.generator = data, config, device, generator
        self.augment = BatchAugment(AugmentConfig(brightness=0.0, contrast=0.0, jitter_p=0.0, mean=config.mean,
                                                  std=config.std), config.size, config.channels)

    # -- inputs
    def _inputs(self, frames: np.ndarray, augment: bool) -> torch.Tensor:
        images = self.data.images[torch.from_numpy(frames)].to(self.device, non_blocking=True).float().div_(255.0)
        if augment:
            images = self.augment(images, self.generator)
        images = self.augment.normalize(images)
        return images.contiguous(memory_format=torch.channels_last)

    def _batches(self, frames: np.ndarray) -> list[np.ndarray]:
        size = self.config.batch_size
        return [frames[i : i + size] for i in range(0, len(frames), size)]

    def _training_batches(self, count: int) -> list[np.ndarray]:
        """Shuffled positions ``0 … count-1`` in batches; a last batch of one is dropped (train-mode BatchNorm on
        1×1 feature maps cannot normalise a single sample)."""
        batches = self._batches(torch.randperm(count, generator=self.generator).numpy())
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()
        return batches

    @torch.no_grad()
    def embed(self, model: FineTuneModel, frames: np.ndarray, augment: bool = False) -> torch.Tensor:
        model.eval()
        return torch.cat([model.features(self._inputs(b, augment)) for b in self._batches(frames)]) if len(frames) else torch.empty(0)

    @torch.no_grad()
    def predict(self, model: FineTuneModel, frames: np.ndarray) -> np.ndarray:
        model.eval()
        logits = [model(self._inputs(b, False)) for b in self._batches(frames)]
        return torch.softmax(torch.cat(logits).float(), dim=1).cpu().numpy()

    # -- protocols
    def knn(self, model: FineTuneModel, train: np.ndarray, test: np.ndarray) -> FoldOutcome:
        """Cosine-similarity-weighted vote of the k nearest training frames (frozen features, no augmentation)."""
        train_features = F.normalize(self.embed(model, train), dim=1)
        test_features = F.normalize(self.embed(model, test), dim=1)
        labels = torch.from_numpy(self.data.frame_labels[train]).to(self.device)
        k = min(self.config.knn_k, len(train))
        similarity, neighbours = (test_features @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(test), len(self.data.class_names), device=self.device)
        votes.scatter_add_(1, labels[neighbours], similarity.clamp(min=0.0))
        total = votes.sum(dim=1, keepdim=True)
        probabilities = torch.where(total > 0, votes / total.clamp(min=1e-12), torch.full_like(votes, 1.0 / votes.shape[1]))
        return FoldOutcome(probabilities.cpu().numpy(), 0, None, None)

    def fit(
        self, model: FineTuneModel, train: np.ndarray, test: np.ndarray, val: np.ndarray | None, progress: Progress
    ) -> FoldOutcome:
        """Adam + cosine schedule over ``epochs``. The test fold is predicted after every epoch only for ``max-test``
        or ``test_every_epoch``; otherwise once, with the last epoch's model or, for ``inner-val``, the snapshot
        taken at the selected validation epoch (the same predictions, without a test pass per epoch)."""
        cfg = self.config
        backbone_lr = cfg.lr * (cfg.full_backbone_lr_scale if cfg.protocol == "full" else 1.0)
        groups = [{"params": [p for p in model.trainable.parameters() if p.requires_grad], "lr": backbone_lr},
                  {"params": list(model.head.parameters()), "lr": cfg.lr}]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        labels = torch.from_numpy(self.data.frame_labels).to(self.device)
        cached = cfg.protocol == "linear" and not cfg.linear_augment
        train_features = self.embed(model, train) if cached else None
        every_epoch = cfg.selection == "max-test" or cfg.test_every_epoch
        test_probabilities: list[np.ndarray] = []
        test_accuracy: list[float] = []
        val_scores: list[float] = []
        best_state: dict[str, torch.Tensor] | None = None
        for epoch in range(cfg.epochs):
            model.train()
            losses = []
            for batch in self._training_batches(len(train)):
                frames = train[batch]
                if cached:
                    logits = model.head(train_features[torch.from_numpy(batch)])
                elif cfg.protocol == "linear":
                    logits = model.head(self.embed(model, frames, augment=True))
                else:
                    logits = model(self._inputs(frames, augment=True))
                loss = F.cross_entropy(logits, labels[torch.from_numpy(frames)])
                if not torch.isfinite(loss):
                    raise FineTuneDivergedError(f"non-finite training loss at epoch {epoch + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            scheduler.step()
            postfix = {"loss": f"{np.mean(losses):.3f}"}
            if every_epoch:
                test_probabilities.append(self.predict(model, test))
                test_accuracy.append(self._accuracy(test, test_probabilities[-1]))
                postfix["test_acc"] = f"{test_accuracy[-1]:.3f}"
            if val is not None:
                val_scores.append(classification_metrics(self.data.frame_labels[val], self.predict(model, val))["balanced_accuracy"])
                postfix["val_bacc"] = f"{val_scores[-1]:.3f}"
                if not every_epoch and select_epoch("inner-val", None, val_scores) == epoch:
                    best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            progress.set_postfix(postfix)
            progress.update(1)
        if cfg.selection == "last":
            index = cfg.epochs - 1
        else:
            index = select_epoch(cfg.selection, test_accuracy or None, val_scores or None)
        if every_epoch:
            probabilities = test_probabilities[index]
        else:
            if best_state is not None:
                model.load_state_dict(best_state)
            probabilities = self.predict(model, test)
            progress.set_postfix(test_acc=f"{self._accuracy(test, probabilities):.3f}")
        return FoldOutcome(probabilities, index + 1, test_accuracy or None, val_scores or None)

    def _accuracy(self, frames: np.ndarray, probabilities: np.ndarray) -> float:
        return float((probabilities.argmax(1) == self.data.frame_labels[frames]).mean())


# ------------------------------------------------------------------------------------------------ evaluate


def _fold_metrics(data: EvalData, test_frames: np.ndarray, probabilities: np.ndarray) -> tuple[dict, dict, dict]:
    labels = data.frame_labels[test_frames]
    frame = classification_metrics(labels, probabilities, data.class_names)
    _, video_labels, video_probabilities = video_level(probabilities, labels, data.frame_video[test_frames])
    video = classification_metrics(video_labels, video_probabilities, data.class_names)
    return frame, video, {"frame": np.asarray(frame["confusion"]), "video": np.asarray(video["confusion"])}


@dataclasses.dataclass(frozen=True)
class FoldTask:
    """One fold run: which init, the split seed, the fold and its (training, test) video indices."""

    init: int
    seed: int
    fold: int
    folds: int
    train_videos: np.ndarray
    test_videos: np.ndarray


@dataclasses.dataclass
class FoldResult:
    """A finished fold run: its results.json ``runs`` entry, test frames and their probabilities."""

    task: FoldTask
    run: dict[str, Any]
    test_frames: np.ndarray
    probabilities: np.ndarray
    confusion: dict[str, np.ndarray]


def fold_tasks(data: EvalData, config: EvalConfig, num_inits: int) -> list[FoldTask]:
    """Every (init, seed, fold) run, init-major; every init gets the same folds."""
    per_seed = []
    for seed_number in range(config.seeds):
        split_seed = config.seed + seed_number
        per_seed.append((split_seed, fold_splits(data, config, split_seed)))
    return [
        FoldTask(init, split_seed, fold, len(folds), train, test)
        for init in range(num_inits) for split_seed, folds in per_seed for fold, (train, test) in enumerate(folds)
    ]


def run_fold(
    data: EvalData, backbone: torchvision.models.ResNet, label: str, config: EvalConfig, task: FoldTask,
    bar_position: int = 0,
) -> FoldResult:
    """Train and predict one fold; seeded by (split seed, fold) only, so any process gives the same run."""
    device = resolve_device(config.device)
    started = time.perf_counter()
    torch.manual_seed(1_000_003 * task.seed + task.fold)
    generator = torch.Generator().manual_seed(2_000_003 * task.seed + task.fold)
    train_videos, val_videos = task.train_videos, None
    if config.selection == "inner-val":
        train_videos, val_videos = inner_validation(data, train_videos, config, task.seed * 1009 + task.fold)
    model = FineTuneModel(copy.deepcopy(backbone), len(data.class_names), config.protocol, config.freeze_bn).to(device)
    model = model.optimise_for_cpu(config.size) if device.type == "cpu" else model.to(memory_format=torch.channels_last)
    trainer = FoldTrainer(data, config, device, generator)
    train, test = data.frames_of(train_videos), data.frames_of(task.test_videos)
    val = data.frames_of(val_videos) if val_videos is not None else None
    description = f"{label} seed {task.seed} fold {task.fold + 1}/{task.folds}"
    epochs = 0 if config.protocol == "knn" else config.epochs
    with progress_report(epochs, description, "epoch", leave=False, position=bar_position) as progress:
        if config.protocol == "knn":
            outcome = trainer.knn(model, train, test)
        else:
            outcome = trainer.fit(model, train, test, val, progress)
    frame, video, confusion = _fold_metrics(data, test, outcome.test_probabilities)
    run = {
        "seed": task.seed,
        "fold": task.fold,
        "train_videos": int(len(train_videos)),
        "val_videos": int(len(val_videos)) if val_videos is not None else 0,
        "test_videos": int(len(task.test_videos)),
        "train_frames": int(len(train)),
        "test_frames": int(len(test)),
        "test_video_ids": [data.video_ids[v] for v in task.test_videos],
        "selected_epoch": outcome.selected_epoch,
        "test_accuracy_by_epoch": outcome.test_accuracy,
        "val_balanced_accuracy_by_epoch": outcome.val_balanced_accuracy,
        "frame": frame,
        "video": video,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return FoldResult(task, run, test, outcome.test_probabilities, confusion)


def fold_key(config: EvalConfig, init: str) -> str:
    """What a cached fold result depends on: the evaluation settings and the init (a changed one is recomputed)."""
    import hashlib
    import json

    text = json.dumps({"config": dataclasses.asdict(config), "init": init}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def save_fold_result(path: Path, result: FoldResult, key: str) -> None:
    """One finished fold run, written atomically (a kill leaves the previous state: absent or complete)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(partial, key=key, run=json.dumps(result.run, default=_json_value), test_frames=result.test_frames,
             probabilities=result.probabilities)
    os.replace(partial, path)


def load_fold_result(path: Path, task: FoldTask, key: str) -> FoldResult | None:
    """The cached fold run at ``path`` if it was made with ``key``, else None."""
    import json

    if not path.is_file():
        return None
    with np.load(path) as saved:
        if str(saved["key"]) != key:
            return None
        run = json.loads(str(saved["run"]))
        confusion = {level: np.asarray(run[level]["confusion"]) for level in ("frame", "video")}
        return FoldResult(task, run, saved["test_frames"], saved["probabilities"], confusion)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def init_entry(label: str, report: InitReport, config: EvalConfig, class_names: list[str], folds: Sequence[FoldResult]) -> dict[str, Any]:
    """The results.json entry of one init from its fold runs (in seed, fold order); ``seconds`` sums the runs'."""
    optimistic = config.selection == "max-test"
    confusions = {level: [result.confusion[level] for result in folds] for level in ("frame", "video")}
    runs = [result.run for result in folds]
    return {
        "label": label,
        "init": report.spec,
        "init_report": report.to_dict(),
        "protocol": config.protocol,
        "recipe": config.recipe,
        "selection": config.selection,
        "selection_note": OPTIMISTIC if optimistic else "",
        "optimistic": optimistic,
        "runs": runs,
        "summary": {level: summarize([run[level] for run in runs]) for level in ("frame", "video")},
        "pooled": {level: pooled_metrics(confusions[level], class_names) for level in ("frame", "video")},
        "seconds": round(sum(run["seconds"] for run in runs), 2),
    }


InitSpec = tuple[str, torchvision.models.ResNet, InitReport]
"""(label, backbone, load report) of one init."""


def evaluate_inits(
    data: EvalData,
    inits: Sequence[InitSpec],
    config: EvalConfig,
    jobs: int = 1,
    on_init: Callable[[dict[str, Any], list[FoldResult]], None] | None = None,
    cache: Path | None = None,
) -> list[dict[str, Any]]:
    """Every fold run of every init; returns their results.json entries, in the order of ``inits``.

    ``jobs > 1`` runs fold runs in that many worker processes, each with an equal share of torch's threads (on
    a small CPU, single-threaded runs side by side use the cores better than one run on all of them). A run's
    result does not depend on the process that ran it, up to float rounding from a different thread count.
    ``on_init(entry, fold_results)`` is called for each init, in order, once all its runs are done. With ``cache``
    every finished fold run is kept in ``cache/<label>/seed<S>_fold<F>.npz`` and read back by a rerun with the same
    settings, so an interrupted evaluation resumes at its first unfinished fold.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be ≥ 1, got {jobs}")
    all_tasks = fold_tasks(data, config, len(inits))
    results: list[list[FoldResult]] = [[] for _ in inits]
    entries: list[dict[str, Any]] = []
    keys = [fold_key(config, report.spec) for _, _, report in inits]

    def cached(task: FoldTask) -> Path | None:
        return None if cache is None else cache / inits[task.init][0] / f"seed{task.seed}_fold{task.fold}.npz"

    tasks = []
    for task in all_tasks:
        path = cached(task)
        done = load_fold_result(path, task, keys[task.init]) if path is not None else None
        if done is None:
            tasks.append(task)
        else:
            results[task.init].append(done)

    def keep(result: FoldResult) -> None:
        results[result.task.init].append(result)
        path = cached(result.task)
        if path is not None:
            save_fold_result(path, result, keys[result.task.init])

    def finish_ready_inits() -> None:
        per_init = len(all_tasks) // len(inits)
        while len(entries) < len(inits) and len(results[len(entries)]) == per_init:
            index = len(entries)
            folds = sorted(results[index], key=lambda result: (result.task.seed, result.task.fold))
            label, _, report = inits[index]
            entries.append(init_entry(label, report, config, data.class_names, folds))
            if on_init is not None:
                on_init(entries[-1], folds)

    finish_ready_inits()
    if jobs == 1:
        for task in tasks:
            label, backbone, _ = inits[task.init]
            keep(run_fold(data, backbone, label, config, task))
            finish_ready_inits()
        return entries
    shared = {"data": data, "models": [(label, backbone) for label, backbone, _ in inits], "config": config}
    for result in map_unordered(_fold_in_worker, tasks, jobs, shared):
        keep(result)
        finish_ready_inits()
    return entries


def _fold_in_worker(task: FoldTask, state: dict[str, Any]) -> FoldResult:
    label, backbone = state["models"][task.init]
    return run_fold(state["data"], backbone, label, state["config"], task, state["bar_position"])


def evaluate_init(
    data: EvalData,
    backbone: torchvision.models.ResNet,
    report: InitReport,
    label: str,
    config: EvalConfig,
    on_predictions: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """All folds × seeds of one init, in this process; ``on_predictions`` receives each run's per-frame rows."""

    def emit(_: dict[str, Any], folds: list[FoldResult]) -> None:
        for result in folds:
            on_predictions({"init": label, "seed": result.task.seed, "fold": result.task.fold,  # type: ignore[misc]
                            "frames": result.test_frames, "probabilities": result.probabilities})

    return evaluate_inits(data, [(label, backbone, report)], config, on_init=emit if on_predictions else None)[0]
