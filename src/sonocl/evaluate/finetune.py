"""Fine-tuning one fold: the model (a frozen part, a trainable part, a new head), its training and its predictions.

`FineTuneModel` splits a backbone by protocol (``linear``/``knn``: all frozen; ``last-block``: the family's last
block trainable, `sonocl.backbones.last_block`; ``full``: everything, at a tenth of the head's LR); `FoldTrainer` trains it with Adam and a cosine
schedule, selects the reported epoch (`select_epoch`) and predicts the test fold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sonocl.augment import AugmentConfig, BatchAugment
from sonocl.backbones import last_block
from sonocl.errors import ConfigError
from sonocl.evaluate.config import EvalConfig
from sonocl.evaluate.cpu_kernels import (
    TINY_MAP,
    _ContiguousLayout,
    _stages,
    _use_gemm_convs,
)
from sonocl.evaluate.data import EvalData
from sonocl.evaluate.metrics import (
    classification_metrics,
)
from sonocl.progress import Progress


class FineTuneDivergedError(ConfigError):
    """The fine-tuning loss became NaN or infinite: the recipe's LR is too high for this encoder."""


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


class FineTuneModel(nn.Module):
    """A backbone split into a frozen part (run without autograd) and a trainable part, plus a new Linear head.

    A torchvision ResNet is split stage by stage (`_stages`: the frozen stages never build a graph, and
    `optimise_for_cpu` can lay each out for its map size). Any other backbone (timm) is split by parameters: for
    ``last-block`` and ``full`` the whole model is the trainable part with only the protocol's modules learning
    (`_PartlyTrained`), for ``linear`` and ``knn`` the whole model is frozen."""

    def __init__(self, backbone: nn.Module, num_classes: int, protocol: str, freeze_bn: bool) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn or protocol in ("linear", "knn")
        self.frozen: nn.Module
        self.trainable: nn.Module
        if isinstance(backbone, torchvision.models.ResNet):
            modules, strides = zip(*_stages(backbone))
            split = {"full": 0, "last-block": len(modules) - 1}.get(protocol, len(modules))  # linear, knn: all frozen
            pool = [backbone.avgpool, nn.Flatten(1)]
            self.frozen = nn.Sequential(*modules[:split], *(pool if split == len(modules) else []))
            self.trainable = nn.Sequential(*modules[split:], *(pool if split < len(modules) else []))
            self._strides: tuple[int, ...] = strides
            features = _resnet_feature_dim(backbone)
        else:
            trained = {"full": [backbone], "last-block": last_block(backbone)}.get(protocol, [])
            self.frozen = nn.Identity() if trained else backbone
            self.trainable = _PartlyTrained(backbone, trained, self.freeze_bn) if trained else nn.Identity()
            self._strides = ()
            features = _num_features(backbone)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(features, num_classes)

    def optimise_for_cpu(self, size: int) -> FineTuneModel:
        """Channels-last layout for the large early maps, NCHW from the first stage whose output is ≤ `TINY_MAP` px a
        side, and GEMM convs in the trainable stages on such maps (a split ResNet; any other backbone: channels-last).

        Measured on a 2-core Xeon (AVX-512) at 64 px, last-block: channels-last is faster up to ``layer2`` but about
        2× slower on the 4×4 and 2×2 maps of ``layer3``/``layer4``, where `GemmConv2d` also beats oneDNN's backward.
        Only the kernels change: same parameters, same results up to float rounding.
        """
        self.to(memory_format=torch.channels_last)
        first = next((i for i, stride in enumerate(self._strides) if math.ceil(size / stride) <= TINY_MAP), None)
        if first is None:
            return self
        frozen, trainable = list(cast(nn.Sequential, self.frozen)), list(cast(nn.Sequential, self.trainable))
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


def _resnet_feature_dim(backbone: torchvision.models.ResNet) -> int:
    block = backbone.layer4[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.num_features)


def _num_features(model: nn.Module) -> int:
    """The pooled feature size a timm model states (``num_features``)."""
    value = getattr(model, "num_features", None)
    if not isinstance(value, int):
        raise ConfigError(f"{type(model).__name__} does not state its feature size (timm's num_features)")
    return value


class _PartlyTrained(nn.Module):
    """``model`` of which only the ``trained`` modules learn; with ``freeze_rest`` the others stay in eval mode
    (running statistics, no dropout), as the frozen stages of a split ResNet."""

    def __init__(self, model: nn.Module, trained: list[nn.Module], freeze_rest: bool) -> None:
        super().__init__()
        self.model = model
        self._trained = tuple(trained)  # a plain tuple: the modules are registered once, inside model
        self.freeze_rest = freeze_rest
        model.requires_grad_(False)
        for module in trained:
            module.requires_grad_(True)

    def train(self, mode: bool = True) -> _PartlyTrained:
        super().train(mode)
        if mode and self.freeze_rest:
            self.model.eval()
            for module in self._trained:
                module.train()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


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
        self.augment = BatchAugment(
            AugmentConfig(brightness=0.0, contrast=0.0, jitter_p=0.0, mean=config.mean, std=config.std),
            config.size,
            config.channels,
        )

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
        return (
            torch.cat([model.features(self._inputs(b, augment)) for b in self._batches(frames)])
            if len(frames)
            else torch.empty(0)
        )

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
        probabilities = torch.where(
            total > 0, votes / total.clamp(min=1e-12), torch.full_like(votes, 1.0 / votes.shape[1])
        )
        return FoldOutcome(probabilities.cpu().numpy(), 0, None, None)

    def fit(
        self, model: FineTuneModel, train: np.ndarray, test: np.ndarray, val: np.ndarray | None, progress: Progress
    ) -> FoldOutcome:
        """Adam + cosine schedule over ``epochs``. The test fold is predicted after every epoch only for ``max-test``
        or ``test_every_epoch``; otherwise once, with the last epoch's model or, for ``inner-val``, the snapshot
        taken at the selected validation epoch (the same predictions, without a test pass per epoch)."""
        cfg = self.config
        backbone_lr = cfg.lr * (cfg.full_backbone_lr_scale if cfg.protocol == "full" else 1.0)
        groups = [
            {"params": [p for p in model.trainable.parameters() if p.requires_grad], "lr": backbone_lr},
            {"params": list(model.head.parameters()), "lr": cfg.lr},
        ]
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
                if train_features is not None:
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
                val_scores.append(
                    classification_metrics(self.data.frame_labels[val], self.predict(model, val))["balanced_accuracy"]
                )
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
