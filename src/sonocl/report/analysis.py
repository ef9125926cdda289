"""What `sonocl report` computes from a run, its store, its checkpoints and its encoder; `sonocl.report.run_sections` lays
the results out as figures, tables and notes.

- `gallery_pairs`: the first pairs of training step 1 and their two views, as the loop drew them
  (`sonocl.train.replay`);
- `cmw_pair_weights` / `cmw_weights_of_checkpoints`: the CMW-Net of a Meta-USCL checkpoint applied to pairs of the
  epoch it ended; `per_epoch_mean`: a step column of ``metrics.csv`` averaged per epoch;
- `encoder_features`, `embedding_maps` (`tsne`, UMAP when installed): the embedding map;
- `gradcam_probe`: a linear head (`linear_head`) fitted on frozen features of some videos, the examples it
  classifies (`spread`) and their Grad-CAMs.

A computation that does not apply to the run raises `Skipped` with the reason the page shows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sonocl.backbones import CamTarget

GALLERY_PAIRS = 6
GRADCAM_PER_KIND = 4
MAX_MAP_POINTS = 600
CMW_PAIRS = 256


class Skipped(Exception):
    """A part of the page that does not apply to this run; the message says why (the page shows it as a note)."""


def display_image(image: Any, mean: float, std: float) -> np.ndarray:
    """A normalised ``(C, s, s)`` tensor's first channel back in [0, 1], as an array for display."""
    return (image[0] * std + mean).clamp(0, 1).numpy()


# ------------------------------------------------------------------------------------------ pair gallery


@dataclass
class GalleryPairs:
    """The first pairs of a training step's batch and their two views."""

    batch: Any
    """The shown items of the step's `PairBatch` (frames, mixing weights, videos)."""
    total: int
    """Pairs in the step's whole batch."""
    views: np.ndarray
    """``(shown, 2, size, size)`` in [0, 1]: the views as the encoder got them, de-normalised for display."""


def gallery_pairs(cfg: Any, store: Any, count: int = GALLERY_PAIRS) -> GalleryPairs:
    """The first ``count`` pairs of training step 1 (global step 0) with exactly that step's augmentation draw."""
    from sonocl.errors import ConfigError
    from sonocl.train.replay import RunReplay

    try:
        replay = RunReplay(cfg, store)
    except ConfigError:
        raise
    except ValueError as error:
        raise Skipped(f"the sampler gives no batch here ({error}).") from error
    drawn = replay.step(0)
    shown = min(count, len(drawn.batch))
    mean, std = cfg.augment.mean, cfg.augment.std
    views = [[display_image(view[b], mean, std) for view in (drawn.view1, drawn.view2)] for b in range(shown)]
    return GalleryPairs(drawn.batch[:shown], len(drawn.batch), np.array(views))


# ---------------------------------------------------------------------------------------- CMW weights


@dataclass
class PairWeights:
    """CMW-Net weights of pairs of one epoch, with the cosine similarity of their views' backbone features."""

    checkpoint: Path
    epoch: int
    """The epoch the checkpoint ended (1-based), whose pairs are weighed."""
    weight: np.ndarray
    cosine: np.ndarray
    label: np.ndarray
    """Class code of each pair's video (−1 unlabelled)."""
    class_names: list[str]


def cmw_pair_weights(checkpoint_path: Path, cfg: Any, store: Any, max_pairs: int = CMW_PAIRS) -> PairWeights | None:
    """CMW-Net weights and feature cosine similarities of up to ``max_pairs`` pairs of the checkpoint's last epoch
    (the run's sampler, augmentation and step seeds; backbone in training mode as in the step, nothing updated), or
    None without a CMW-Net."""
    import torch
    import torch.nn.functional as F

    from sonocl.backbones import Backbone
    from sonocl.models import CMWNet, build_backbone, checkpoint_backbone_state
    from sonocl.train.replay import RunReplay

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    cmw_state = {k[len("cmw.") :]: v for k, v in checkpoint.get("objective", {}).items() if k.startswith("cmw.")}
    if not cmw_state:
        return None
    cmw = CMWNet(Backbone.named(cfg.model.backbone).feature_dim, cfg.options.cmw_hidden)
    cmw.load_state_dict(cmw_state)
    backbone = build_backbone(cfg.model.backbone, cfg.model.channels, checkpoint_backbone_state(checkpoint), cfg.size)
    codes, class_names = store.label_codes(cfg.label_column)
    replay = RunReplay(cfg, store)
    epoch = max(int(checkpoint.get("epoch", 1)), 1)
    first = (epoch - 1) * replay.steps_per_epoch
    weights, cosines, labels = [], [], []
    with torch.no_grad():
        for step in range(first, first + replay.steps_per_epoch):
            drawn = replay.step(step)
            backbone.train(len(drawn.batch) > 1)
            h1, h2 = backbone(drawn.view1).flatten(1), backbone(drawn.view2).flatten(1)
            weights.append((cmw(h1, h2) * torch.from_numpy(drawn.batch.weight)).numpy())
            cosines.append(F.cosine_similarity(h1, h2, dim=1).numpy())
            labels.append(codes[drawn.batch.video])
            if sum(len(w) for w in weights) >= max_pairs:
                break
    return PairWeights(
        checkpoint=checkpoint_path,
        epoch=epoch,
        weight=np.concatenate(weights)[:max_pairs],
        cosine=np.concatenate(cosines)[:max_pairs],
        label=np.concatenate(labels)[:max_pairs],
        class_names=class_names,
    )


def cmw_weights_of_checkpoints(checkpoints: Iterable[Path], cfg: Any, store: Any) -> list[PairWeights]:
    """`cmw_pair_weights` of each checkpoint that holds a CMW-Net, one per epoch (the first checkpoint of it)."""
    results: list[PairWeights] = []
    for checkpoint_path in checkpoints:
        result = cmw_pair_weights(checkpoint_path, cfg, store)
        if result is not None and all(result.epoch != seen.epoch for seen in results):
            results.append(result)
    return results


def per_epoch_mean(
    epoch: np.ndarray, mean: np.ndarray, std: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch of ``metrics.csv``'s step rows: the average of a step column (``mean``) and of its spread column."""
    epochs = np.unique(epoch[np.isfinite(epoch)])
    means, stds = [], []
    for e in epochs:
        chosen = (epoch == e) & np.isfinite(mean)
        means.append(float(mean[chosen].mean()) if chosen.any() else np.nan)
        stds.append(float(np.nanmean(std[chosen])) if std is not None and chosen.any() else 0.0)
    return epochs, np.array(means), np.array(stds)


# ------------------------------------------------------------------------------------------ embedding map


@dataclass
class FrameFeatures:
    frames: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    """class code per frame, −1 unlabelled"""
    class_names: list[str]
    videos: np.ndarray


def frames_per_video(store: Any, max_points: int) -> int:
    """Frames taken per video (evenly spaced) for a map of about ``max_points`` frames."""
    return max(2, max_points // max(store.num_videos, 1))


def encoder_features(
    encoder: Any, store: Any, max_points: int = MAX_MAP_POINTS, seed: int = 0, device: str = "cpu"
) -> FrameFeatures:
    """Backbone features h of evenly spaced frames of every video, at most ``max_points`` (a seeded subsample)."""
    from sonocl.report.embed import frame_features, select_frames

    frames = select_frames(store, max_per_video=frames_per_video(store, max_points))
    if len(frames) > max_points:
        frames = np.sort(np.random.default_rng(seed).choice(frames, max_points, replace=False))
    codes, class_names = store.label_codes()
    videos = store.frame_video[frames]
    features = frame_features(encoder, store, frames, device, batch_size=64)
    return FrameFeatures(frames, features, codes[videos], class_names, videos)


def tsne(points: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def embedding_maps(data: FrameFeatures, seed: int) -> list[tuple[str, np.ndarray]]:
    """2-D maps of the L2-normalised features: ``("t-SNE", xy)``, then ``("UMAP", xy)`` when umap-learn is installed."""
    unit = data.features / np.maximum(np.linalg.norm(data.features, axis=1, keepdims=True), 1e-12)
    maps = [("t-SNE", tsne(unit, seed))]
    try:
        import umap  # optional

        maps.append(("UMAP", umap.UMAP(n_components=2, random_state=seed).fit_transform(unit)))
    except ImportError:
        pass
    return maps


# ---------------------------------------------------------------------------------------------- Grad-CAM


@dataclass
class GradcamExample:
    frame: int
    correct: bool
    truth: int
    predicted: int
    confidence: float
    """The head's probability of the predicted class."""
    image: np.ndarray
    """The encoder's input, de-normalised to [0, 1]."""
    cam: np.ndarray
    """Grad-CAM of the predicted class, in [0, 1], at the input's size."""


@dataclass
class GradcamProbe:
    """A linear head on frozen features, fitted on some labelled videos and applied to frames of the others."""

    examples: list[GradcamExample]
    """The most confident correct examples, then the wrong ones, each spread over the classes (`spread`)."""
    correct: int
    """Test frames classified correctly; ``wrong`` wrongly."""
    wrong: int
    accuracy: float
    train_videos: int
    test_videos: int
    layer: str
    """The layer Grad-CAM is taken on (`sonocl.backbones.cam_target`)."""
    grid: tuple[int, int]
    """Cells of its map at the encoder's input size."""


def probe_split(data: FrameFeatures, store: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks over ``data``'s frames: labelled frames of about 70 % of the labelled videos (grouped) and of the rest."""
    from sonocl.data.splits import grouped_holdout

    labelled = data.labels >= 0
    video_codes = np.full(store.num_videos, -1)
    video_codes[data.videos[labelled]] = data.labels[labelled]
    if len(np.unique(data.labels[labelled])) < 2:
        raise Skipped("Grad-CAM needs labelled frames of at least two classes.")
    videos = np.flatnonzero(video_codes >= 0)
    try:
        train_videos, test_videos = grouped_holdout(video_codes[videos], store.group_codes()[videos], 0.3, seed)
    except ValueError as error:
        raise Skipped(f"no grouped split of the labelled videos ({error}).") from error
    train = labelled & np.isin(data.videos, videos[train_videos])
    test = labelled & np.isin(data.videos, videos[test_videos])
    if len(np.unique(data.labels[train])) < 2 or not test.any():
        raise Skipped("the grouped split leaves fewer than two classes for training or no test frames.")
    return train, test


def gradcam_probe(encoder: Any, data: FrameFeatures, store: Any, seed: int) -> GradcamProbe:
    """Fit the head on the training frames of `probe_split`, classify the test frames, and take Grad-CAM (on the
    backbone's `cam_target`) of the predicted class for up to `GRADCAM_PER_KIND` correct and as many wrong frames."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from sonocl.backbones import cam_target
    from sonocl.errors import ConfigError

    train, test = probe_split(data, store, seed)
    scaler = StandardScaler().fit(data.features[train])
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(data.features[train]), data.labels[train])
    probabilities = classifier.predict_proba(scaler.transform(data.features[test]))
    predicted = classifier.classes_[probabilities.argmax(axis=1)]
    truth, confidence = data.labels[test], probabilities.max(axis=1)
    correct, wrong = np.flatnonzero(predicted == truth), np.flatnonzero(predicted != truth)
    chosen = [(i, True) for i in spread(correct, truth, confidence)] + [
        (i, False) for i in spread(wrong, truth, confidence)
    ]
    test_frames = data.frames[test]
    frames = np.array([test_frames[i] for i, _ in chosen], dtype=np.int64)
    head = linear_head(classifier, scaler, len(data.class_names))
    try:
        target = cam_target(encoder.backbone.to("cpu"), encoder.channels, encoder.size)
    except ConfigError as error:
        raise Skipped(str(error)) from error
    images, cams = gradcam_maps(encoder, target, head, store, frames, predicted[[i for i, _ in chosen]])
    examples = [
        GradcamExample(
            frame=int(frame),
            correct=ok,
            truth=int(truth[i]),
            predicted=int(predicted[i]),
            confidence=float(confidence[i]),
            image=display_image(image, encoder.mean, encoder.std),
            cam=cam.numpy(),
        )
        for (i, ok), frame, image, cam in zip(chosen, frames, images, cams)
    ]
    return GradcamProbe(
        examples=examples,
        correct=len(correct),
        wrong=len(wrong),
        accuracy=float((predicted == truth).mean()),
        train_videos=len(np.unique(data.videos[train])),
        test_videos=len(np.unique(data.videos[test])),
        layer=target.name,
        grid=target.grid,
    )


def gradcam_maps(
    encoder: Any, target: CamTarget, head: Any, store: Any, frames: np.ndarray, classes: np.ndarray
) -> tuple[Any, Any]:
    """The encoder's normalised inputs of ``frames`` and Grad-CAM on ``target`` of ``classes`` for backbone +
    ``head``."""
    import torch

    from sonocl.augment import resize_to
    from sonocl.report.gradcam import BackboneClassifier, GradCAM

    images = (resize_to(torch.from_numpy(store.gather(frames)), encoder.size) - encoder.mean) / encoder.std
    if encoder.channels == 3:
        images = images.expand(-1, 3, -1, -1)
    backbone = encoder.backbone.to("cpu").eval()
    model = BackboneClassifier(backbone, head).eval()
    cams, _ = GradCAM(model, target.layer, target.to_map)(images, torch.from_numpy(classes))
    return images, cams


def spread(indices: np.ndarray, truth: np.ndarray, confidence: np.ndarray, count: int = GRADCAM_PER_KIND) -> list[int]:
    """Up to ``count`` of ``indices``, most confident first, taking the classes in turn."""
    by_class: dict[int, list[int]] = {}
    for i in sorted(indices, key=lambda j: -confidence[j]):
        by_class.setdefault(int(truth[i]), []).append(int(i))
    out: list[int] = []
    while len(out) < count and any(by_class.values()):
        for queue in by_class.values():
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def linear_head(classifier: Any, scaler: Any, num_classes: int) -> Any:
    """The logistic regression (on standardised features) as one ``nn.Linear`` on raw features, one logit per class."""
    import torch
    from torch import nn

    coef = classifier.coef_ / scaler.scale_[None, :]
    intercept = classifier.intercept_ - (classifier.coef_ * (scaler.mean_ / scaler.scale_)[None, :]).sum(axis=1)
    if coef.shape[0] == 1:  # binary: one logit z for classes_[1]; softmax([−z/2, z/2]) gives the same probabilities
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, -1e4)  # classes absent from training are never predicted
    weight[classifier.classes_] = coef
    bias[classifier.classes_] = intercept
    head = nn.Linear(coef.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return head
