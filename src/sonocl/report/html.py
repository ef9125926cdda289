"""`sonocl report PATH... [--out report.html]`: one self-contained HTML page of runs and evaluations.

Each PATH is a pretraining run (``metrics.csv``, ``config.yaml``, ``checkpoints/``, ``encoder.safetensors``), a
`sonocl evaluate` output (``results.json`` with schema ``sonocl.evaluate/1``, ``predictions.csv``) or a
`sonocl segment` output (``results.json`` with schema ``sonocl.segment/1``, ``overlays/``). The page holds
what applies (docs/report.md):

- run: settings, training curves, a pair gallery re-created from the run's configuration and store, CMW-Net
  weights (Meta-USCL), an embedding map, Grad-CAM overlays;
- evaluation: the comparison table, confusion matrices, per-fold scores, accuracy by epoch, ROC curves;
- segmentation: the table, per-fold Dice, overlays.

Images are PNGs embedded as ``data:`` URIs; the page has no script and loads nothing from anywhere. A part that
needs the frame store (pair gallery, embedding map, Grad-CAM, CMW weights) is replaced by a note saying why
when the store cannot be opened.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import json
import math
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sonocl import __version__
from sonocl.errors import UserError
from sonocl.evaluate.metrics import METRIC_COLUMNS, percent

GALLERY_PAIRS = 6
GRADCAM_PER_KIND = 4
SEGMENTATION_OVERLAYS = 6
MAX_MAP_POINTS = 600
CMW_PAIRS = 256


class ReportError(UserError, ValueError):
    """A PATH the report cannot use; the message names it and says what was expected."""


# ------------------------------------------------------------------------------------------------ page


@dataclass
class Section:
    """One part of the page: an anchor, a heading and its HTML body."""

    anchor: str
    title: str
    body: list[str] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.body.append(f"<p>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.body.append(f'<p class="note">{html.escape(text)}</p>')

    def figure(self, png: bytes, caption: str, alt: str | None = None) -> None:
        self.body.append(figure_html(png, caption, alt))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
        self.body.append(table_html(header, rows, caption))

    def render(self, level: int = 2) -> str:
        inner = "\n".join(self.body + [child.render(level + 1) for child in self.children])
        return f'<section id="{self.anchor}">\n<h{level}>{html.escape(self.title)}</h{level}>\n{inner}\n</section>'


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", png[16:24])


def figure_html(png: bytes, caption: str, alt: str | None = None) -> str:
    """An ``<img>`` with the PNG inline and its intrinsic size (CSS scales it down, keeping the aspect ratio)."""
    width, height = png_size(png)
    data = base64.b64encode(png).decode("ascii")
    alt_text = html.escape(alt or caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{alt_text}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table_html(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 24px 48px; color: #1a1a1a; line-height: 1.45; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 40px; }
h3 { margin-top: 28px; } nav li { margin: 2px 0; } .meta, .note, figcaption { color: #555; font-size: 0.92em; }
.note { background: #f6f6f0; border-left: 3px solid #E69F00; padding: 6px 10px; }
figure { margin: 16px 0; } img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; } td { white-space: nowrap; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; } caption { text-align: left; color: #555; padding: 4px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; } .gallery figure { margin: 0; max-width: 280px; }
"""


def render_page(title: str, intro: list[str], sections: list[Section]) -> str:
    toc = "".join(
        f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a>'
        + (
            "<ul>" + "".join(f'<li><a href="#{c.anchor}">{html.escape(c.title)}</a></li>' for c in s.children) + "</ul>"
            if s.children
            else ""
        )
        + "</li>"
        for s in sections
    )
    body = "\n".join(section.render() for section in sections)
    paragraphs = "".join(f'<p class="meta">{html.escape(line)}</p>' for line in intro)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{paragraphs}\n<nav><ul>{toc}</ul></nav>\n{body}\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------- inputs


def classify_path(path: Path) -> str:
    """``run``, ``evaluation`` or ``segmentation``; `ReportError` otherwise."""
    results = path / "results.json"
    if results.is_file():
        schema = str(_read_json(results).get("schema", ""))
        if schema.startswith("sonocl.evaluate"):
            return "evaluation"
        if schema.startswith("sonocl.segment"):
            return "segmentation"
        raise ReportError(f"{results}: unknown schema {schema!r} (expected sonocl.evaluate/… or sonocl.segment/…)")
    if (path / "metrics.csv").is_file() or (path / "config.yaml").is_file():
        return "run"
    raise ReportError(
        f"{path}: not a sonocl pretraining run (metrics.csv, config.yaml), evaluation or segmentation "
        "output (results.json)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: cannot read ({error})") from error


def read_metrics(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``metrics.csv`` as two column dicts of float arrays (empty cells → NaN): step rows and epoch rows."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    def columns(kind: str) -> dict[str, np.ndarray]:
        chosen = [r for r in rows if r.get("kind") == kind]
        names = [k for k in (rows[0].keys() if rows else []) if k != "kind"]
        return {name: np.array([_float(r.get(name)) for r in chosen], dtype=float) for name in names}

    return columns("step"), columns("epoch")


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


@dataclass
class Context:
    """Options shared by the section builders."""

    device: str = "cpu"
    seed: int = 0
    max_points: int = MAX_MAP_POINTS
    timings: dict[str, float] = field(default_factory=dict)


def open_store(spec: str, relative_to: Path) -> Any:
    """The `FrameStore` at ``spec`` (as given, else relative to ``relative_to``); `ReportError` when unreachable."""
    from sonocl.data.store import FrameStore, StoreError

    if not spec:
        raise ReportError("no store path recorded")
    candidates = [Path(spec)]
    if not Path(spec).is_absolute():
        candidates.append(relative_to / spec)
    for candidate in candidates:
        if candidate.is_dir():
            try:
                return FrameStore.open(candidate)
            except StoreError as error:
                raise ReportError(f"{candidate}: {error}") from error
    raise ReportError(f"the frame store {spec} is not reachable from here")


# ------------------------------------------------------------------------------------------------- run


def run_section(path: Path, ctx: Context) -> Section:
    from sonocl.train.config import ConfigError, from_dict, load_yaml

    section = Section(_anchor("run", path), f"Pretraining run: {path.name}")
    cfg = None
    if (path / "config.yaml").is_file():
        try:
            cfg = from_dict(load_yaml(path / "config.yaml"))
        except ConfigError as error:
            section.note(f"config.yaml cannot be read ({error}); only the logged metrics are shown.")
    if cfg is not None:
        section.table(
            ["setting", "value"],
            [
                ("method", cfg.method),
                ("store", cfg.store),
                ("backbone", f"{cfg.model.backbone}, {cfg.model.channels}-channel stem, init {cfg.model.init}"),
                (
                    "budget",
                    f"{cfg.steps} steps × batch {cfg.batch_size} = {cfg.steps * cfg.batch_size} pairs"
                    if cfg.steps
                    else f"{cfg.epochs} epochs × batch {cfg.batch_size}",
                ),
                ("input size", f"{cfg.size} px"),
                (
                    "optimiser",
                    f"{cfg.optim.name}, lr {cfg.optim.lr:g} ({cfg.optim.lr_scaling} scaling), wd {cfg.optim.weight_decay:g}",
                ),
                ("temperature", f"{cfg.options.temperature:g}"),
                ("seed", cfg.seed),
                ("held-out share of videos", cfg.val_fraction),
            ],
            caption=f"{path / 'config.yaml'}",
        )

    steps: dict[str, np.ndarray] = {}
    epochs: dict[str, np.ndarray] = {}
    if (path / "metrics.csv").is_file():
        steps, epochs = read_metrics(path / "metrics.csv")
        section.children.append(_training_section(path, steps, epochs))
    else:
        section.note(f"{path / 'metrics.csv'} is missing: no training curves.")

    store = None
    store_problem = ""
    if cfg is not None:
        try:
            store = open_store(cfg.store, path)
        except ReportError as error:
            store_problem = str(error)
    else:
        store_problem = "no config.yaml, so the store is unknown"

    gallery = Section(_anchor("pairs", path), "Positive pairs as the sampler and the augmentation make them")
    section.children.append(gallery)
    if store is None:
        gallery.note(f"Skipped: {store_problem}.")
    else:
        _timed(ctx, "pairs", lambda: _pair_gallery(gallery, cfg, store))

    if cfg is not None and cfg.method == "meta-uscl":
        cmw = Section(_anchor("cmw", path), "Meta-USCL: CMW-Net pair weights")
        section.children.append(cmw)
        _timed(ctx, "cmw", lambda: _cmw_section(cmw, path, cfg, store, store_problem, steps))

    embedding = Section(_anchor("embedding", path), "Embedding map")
    gradcam = Section(_anchor("gradcam", path), "Grad-CAM: what the encoder looks at")
    section.children += [embedding, gradcam]
    if store is None:
        for part in (embedding, gradcam):
            part.note(f"Skipped: {store_problem}.")
        return section
    try:
        from sonocl.report.embed import load_encoder_for_features

        encoder = load_encoder_for_features(str(path))
    except (OSError, ValueError, RuntimeError) as error:
        for part in (embedding, gradcam):
            part.note(f"Skipped: the run's encoder cannot be loaded ({error}).")
        return section
    features = _timed(ctx, "features", lambda: _encoder_features(encoder, store, ctx))
    _timed(
        ctx,
        "embedding",
        lambda: _embedding_section(embedding, features, store, ctx, f"the run's encoder ({path.name})"),
    )
    _timed(ctx, "gradcam", lambda: _gradcam_section(gradcam, encoder, features, store, ctx))
    return section


def _timed(ctx: Context, name: str, work: Any) -> Any:
    started = time.perf_counter()
    try:
        return work()
    finally:
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - started


def _anchor(kind: str, path: Path) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in path.name)
    return f"{kind}-{safe}-{zlib.crc32(str(path.resolve()).encode()) % 10_000:04d}"


def _training_section(path: Path, steps: dict[str, np.ndarray], epochs: dict[str, np.ndarray]) -> Section:
    from sonocl.report import figures

    section = Section(_anchor("curves", path), "Training curves")
    if not len(steps.get("step", [])) and not len(epochs.get("epoch", [])):
        section.note("metrics.csv has no rows yet.")
        return section
    section.figure(
        figures.png_bytes(figures.training_curves(steps, epochs)),
        "Per optimiser step: the objective's total loss and each part it reports, and the learning rate. Per epoch "
        "(on held-out videos, never part of the loss): the unweighted InfoNCE validation loss, the online kNN "
        "accuracy of held-out labelled frames against training frames, and the collapse metric (std of the "
        "L2-normalised projections × √D: about 1 when spread, 0 when collapsed).",
    )
    last = {k: v[-1] for k, v in epochs.items() if len(v) and math.isfinite(v[-1])}
    if last:
        cells = [("epoch", int(last.get("epoch", 0)))]
        cells += [
            (name, f"{last[key]:.4f}")
            for key, name in (
                ("val_loss", "validation loss"),
                ("knn_acc", "kNN accuracy"),
                ("embedding_std", "collapse metric"),
            )
            if key in last
        ]
        if "seconds" in last:
            cells.append(("wall time", f"{last['seconds'] / 60:.1f} min"))
        section.table(["last epoch", "value"], cells)
    return section


def _pair_gallery(section: Section, cfg: Any, store: Any) -> None:
    """The first items of epoch 1's first batch with exactly the training step's augmentation draw."""
    import torch

    from sonocl.augment import make_views
    from sonocl.report import figures
    from sonocl.train.replay import build_augment, split_videos, step_seed, training_sampler

    kept, _ = split_videos(cfg, store)
    try:
        batch = training_sampler(cfg, store, kept, cfg.batch_size).batches(0)[0]
    except (ValueError, IndexError) as error:
        section.note(f"Skipped: the sampler gives no batch here ({error}).")
        return
    augment = build_augment(cfg)
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, 0, 0))
    extra = torch.from_numpy(batch.label >= 0) if cfg.augment.gamma > 0 else None
    view1, view2 = make_views(
        torch.from_numpy(store.gather(batch.frames)), batch.mix, batch.augment_first, augment, generator, extra
    )
    shown = min(GALLERY_PAIRS, len(batch))
    items = []
    for b in range(shown):
        frames = batch.frames[b]
        video = store.videos[int(batch.video[b])]
        sources = [store.frames[int(f)] for f in frames]
        source_titles = [
            f"f{j + 1}: frame {int(store.frame_in_video[f])}\nt = {store.frame_time[f]:.2f} s"
            for j, f in enumerate(frames)
        ]
        views = [_display(view1[b], cfg.augment), _display(view2[b], cfg.augment)]
        view_titles = [f"view {v + 1} = " + _mix_text(batch.mix[b, v]) for v in range(2)]
        label = video.label or "unlabelled"
        items.append(
            {
                "sources": sources,
                "source_titles": source_titles,
                "views": views,
                "view_titles": view_titles,
                "title": f"{video.id}\n({label})",
            }
        )
    order = (
        "each frame augmented, then mixed (shared frames get one draw)"
        if batch.augment_first
        else "frames mixed, then each view augmented independently"
    )
    section.figure(
        figures.png_bytes(figures.pair_gallery(items)),
        f"{cfg.method}: the first {shown} of the {len(batch)} pairs of training step 1 (epoch 1, seed {cfg.seed}), "
        f"re-created with the run's sampler and augmentation ({order}) and the step's augmentation seed. Left: the "
        f"source frames f1…fk at the store's {store.size} px with their position in the video; right: the two views "
        f"at {cfg.size} px as the encoder sees them (de-normalised for display), with the mixing weights.",
    )
    if torch.cuda.is_available():
        section.note(
            "Drawn on the CPU: a run trained on a GPU drew its augmentation from the GPU's generator, so the "
            "crops and jitter here are from the same distribution but not the identical draw."
        )


def _display(view: Any, augment: Any) -> np.ndarray:
    return (view[0] * augment.std + augment.mean).clamp(0, 1).numpy()


def _mix_text(weights: np.ndarray) -> str:
    terms = [f"{w:.2f}·f{j + 1}" for j, w in enumerate(weights) if abs(w) > 1e-6]
    return " + ".join(terms) if terms else "0"


def _cmw_section(
    section: Section, path: Path, cfg: Any, store: Any, store_problem: str, steps: dict[str, np.ndarray]
) -> None:
    from sonocl.report import figures

    if _has(steps, "part_weight_mean"):
        epoch, mean, std = _per_epoch(steps["epoch"], steps["part_weight_mean"], steps.get("part_weight_std"))
        section.figure(
            figures.png_bytes(figures.cmw_weight_summary(epoch, mean, std)),
            "From metrics.csv: each step logs the mean and std of its batch's CMW-Net weights; shown per "
            "epoch as the average over the epoch's steps. The training loop logs no per-pair weights.",
        )
    if store is None:
        section.note(f"Per-pair weights skipped: {store_problem}.")
        return
    checkpoints = [p for p in (path / "checkpoints" / "last.pt", path / "checkpoints" / "best.pt") if p.is_file()]
    if not checkpoints:
        section.note("Per-pair weights skipped: no checkpoint holds the CMW-Net.")
        return
    histograms: dict[str, np.ndarray] = {}
    scatter = None
    seen_epochs = set()
    for checkpoint_path in checkpoints:
        result = cmw_pair_weights(checkpoint_path, cfg, store)
        if result is None or result["epoch"] in seen_epochs:
            continue
        seen_epochs.add(result["epoch"])
        histograms[f"after epoch {result['epoch']} ({checkpoint_path.name})"] = result["weight"]
        scatter = scatter or result
    if scatter is None:
        section.note("Per-pair weights skipped: the checkpoints hold no CMW-Net.")
        return
    section.figure(
        figures.png_bytes(figures.weight_histograms(histograms)),
        f"Computed here, not logged: the CMW-Net of each checkpoint weighs {len(scatter['weight'])} pairs of "
        "the epoch it ended (the run's sampler, augmentation and step seeds; backbone in training mode as in "
        "the step, nothing updated). Only the checkpoints' epochs are available.",
    )
    section.figure(
        figures.png_bytes(
            figures.weight_vs_cosine(scatter["cosine"], scatter["weight"], scatter["label"], scatter["class_names"])
        ),
        f"Each pair's weight (CMW-Net after epoch {scatter['epoch']}) against the cosine similarity of the "
        "backbone features h of its two views (the CMW-Net's input), coloured by the video's class.",
    )


def _has(columns: dict[str, np.ndarray], key: str) -> bool:
    return key in columns and bool(np.isfinite(columns[key]).any())


def _per_epoch(
    epoch: np.ndarray, mean: np.ndarray, std: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    epochs = np.unique(epoch[np.isfinite(epoch)])
    means, stds = [], []
    for e in epochs:
        chosen = (epoch == e) & np.isfinite(mean)
        means.append(float(mean[chosen].mean()) if chosen.any() else math.nan)
        stds.append(float(np.nanmean(std[chosen])) if std is not None and chosen.any() else 0.0)
    return epochs, np.array(means), np.array(stds)


def cmw_pair_weights(checkpoint_path: Path, cfg: Any, store: Any, max_pairs: int = CMW_PAIRS) -> dict[str, Any] | None:
    """CMW-Net weights and feature cosine similarities of pairs of the checkpoint's last epoch, or None without a CMW-Net."""
    import torch
    import torch.nn.functional as F

    from sonocl.augment import make_views
    from sonocl.models import CMWNet, build_backbone, checkpoint_backbone_state, feature_dim
    from sonocl.train.replay import build_augment, split_videos, step_seed, training_sampler

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    cmw_state = {k[len("cmw.") :]: v for k, v in checkpoint.get("objective", {}).items() if k.startswith("cmw.")}
    if not cmw_state:
        return None
    cmw = CMWNet(feature_dim(cfg.model.backbone), cfg.options.cmw_hidden)
    cmw.load_state_dict(cmw_state)
    backbone = build_backbone(cfg.model.backbone, cfg.model.channels, checkpoint_backbone_state(checkpoint))
    codes, class_names = store.label_codes(cfg.label_column)
    sampler = training_sampler(cfg, store, split_videos(cfg, store)[0], cfg.batch_size)
    epoch = max(int(checkpoint.get("epoch", 1)), 1)
    steps_per_epoch = len(sampler)
    augment = build_augment(cfg)
    generator = torch.Generator()
    weights, cosines, labels = [], [], []
    with torch.no_grad():
        for step, batch in enumerate(sampler.batches(epoch - 1)):
            generator.manual_seed(step_seed(cfg.seed, 0, (epoch - 1) * steps_per_epoch + step))
            view1, view2 = make_views(
                torch.from_numpy(store.gather(batch.frames)), batch.mix, batch.augment_first, augment, generator
            )
            backbone.train(len(batch) > 1)
            h1, h2 = backbone(view1).flatten(1), backbone(view2).flatten(1)
            weights.append((cmw(h1, h2) * torch.from_numpy(batch.weight)).numpy())
            cosines.append(F.cosine_similarity(h1, h2, dim=1).numpy())
            labels.append(codes[batch.video])
            if sum(len(w) for w in weights) >= max_pairs:
                break
    return {
        "epoch": epoch,
        "weight": np.concatenate(weights)[:max_pairs],
        "cosine": np.concatenate(cosines)[:max_pairs],
        "label": np.concatenate(labels)[:max_pairs],
        "class_names": class_names,
    }


# --------------------------------------------------------------------------- embedding map and Grad-CAM


@dataclass
class FrameFeatures:
    frames: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    """class code per frame, −1 unlabelled"""
    class_names: list[str]
    videos: np.ndarray


def _encoder_features(encoder: Any, store: Any, ctx: Context) -> FrameFeatures:
    from sonocl.report.embed import frame_features, select_frames

    per_video = max(2, ctx.max_points // max(store.num_videos, 1))
    frames = select_frames(store, max_per_video=per_video)
    if len(frames) > ctx.max_points:
        frames = np.sort(np.random.default_rng(ctx.seed).choice(frames, ctx.max_points, replace=False))
    codes, class_names = store.label_codes()
    videos = store.frame_video[frames]
    features = frame_features(encoder, store, frames, ctx.device, batch_size=64)
    return FrameFeatures(frames, features, codes[videos], class_names, videos)


def _embedding_section(section: Section, data: FrameFeatures, store: Any, ctx: Context, source: str) -> None:
    from sonocl.report import figures

    if len(data.frames) < 5:
        section.note(f"Skipped: only {len(data.frames)} frames.")
        return
    unit = data.features / np.maximum(np.linalg.norm(data.features, axis=1, keepdims=True), 1e-12)
    maps = [("t-SNE", _tsne(unit, ctx.seed))]
    try:
        import umap  # optional

        maps.append(("UMAP", umap.UMAP(n_components=2, random_state=ctx.seed).fit_transform(unit)))
    except ImportError:
        pass
    for name, xy in maps:
        section.figure(
            figures.png_bytes(figures.embedding_map(xy, data.labels, data.class_names, data.videos, name)),
            f"{name} of the backbone features h (L2-normalised) of {len(data.frames)} frames (evenly spaced, at most "
            f"{max(2, ctx.max_points // max(store.num_videos, 1))} per video) of {len(np.unique(data.videos))} videos "
            f"from {source}. Left: by class; right: by video. Frames of one video clustering apart from their class "
            "means the encoder tells videos apart more than classes.",
        )
    if len(maps) == 1:
        section.note("UMAP is not installed (pip install umap-learn); t-SNE only.")


def _tsne(points: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def _gradcam_section(section: Section, encoder: Any, data: FrameFeatures, store: Any, ctx: Context) -> None:
    """A linear head fitted on frozen features of some videos; Grad-CAM of its prediction on frames of the others."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from sonocl.augment import resize_to
    from sonocl.data.splits import grouped_holdout
    from sonocl.report import figures
    from sonocl.report.gradcam import BackboneClassifier, GradCAM

    labelled = data.labels >= 0
    video_codes = np.full(store.num_videos, -1)
    video_codes[data.videos[labelled]] = data.labels[labelled]
    if len(np.unique(data.labels[labelled])) < 2:
        section.note("Skipped: Grad-CAM needs labelled frames of at least two classes.")
        return
    videos = np.flatnonzero(video_codes >= 0)
    try:
        train_videos, test_videos = grouped_holdout(video_codes[videos], store.group_codes()[videos], 0.3, ctx.seed)
    except ValueError as error:
        section.note(f"Skipped: no grouped split of the labelled videos ({error}).")
        return
    train_videos, test_videos = videos[train_videos], videos[test_videos]
    train = labelled & np.isin(data.videos, train_videos)
    test = labelled & np.isin(data.videos, test_videos)
    if len(np.unique(data.labels[train])) < 2 or not test.any():
        section.note("Skipped: the grouped split leaves fewer than two classes for training or no test frames.")
        return
    scaler = StandardScaler().fit(data.features[train])
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(data.features[train]), data.labels[train])
    head = _linear_head(classifier, scaler, len(data.class_names))
    probabilities = classifier.predict_proba(scaler.transform(data.features[test]))
    predicted = classifier.classes_[probabilities.argmax(axis=1)]
    truth = data.labels[test]
    test_frames = data.frames[test]
    confidence = probabilities.max(axis=1)
    correct = np.flatnonzero(predicted == truth)
    wrong = np.flatnonzero(predicted != truth)
    chosen = [(i, True) for i in _spread(correct, truth, confidence)] + [
        (i, False) for i in _spread(wrong, truth, confidence)
    ]
    frames = np.array([test_frames[i] for i, _ in chosen], dtype=np.int64)
    images = (resize_to(torch.from_numpy(store.gather(frames)), encoder.size) - encoder.mean) / encoder.std
    if encoder.channels == 3:
        images = images.expand(-1, 3, -1, -1)
    model = BackboneClassifier(encoder.backbone.to("cpu").eval(), head).eval()
    cams, _ = GradCAM(model, model[0].layer4)(images, torch.from_numpy(predicted[[i for i, _ in chosen]]))
    cells = encoder.size
    for _ in range(5):  # the ResNet stem and layers 2–4 each halve the side, rounding up
        cells = (cells + 1) // 2
    grid = (cells, cells)
    items = []
    for (i, ok), image, cam, frame in zip(chosen, images, cams, frames):
        video = store.videos[int(store.frame_video[frame])]
        mark = "✓" if ok else "✗"
        items.append(
            {
                "image": (image[0] * encoder.std + encoder.mean).clamp(0, 1).numpy(),
                "cam": cam.numpy(),
                "title": f"{mark} true {data.class_names[truth[i]]}, predicted {data.class_names[predicted[i]]} "
                f"({100 * confidence[i]:.0f} %)\n{video.id} frame {int(store.frame_in_video[frame])}",
            }
        )
    accuracy = float((predicted == truth).mean())
    section.figure(
        figures.png_bytes(figures.gradcam_grid(items)),
        f"Grad-CAM on layer4 for the predicted class, {min(GRADCAM_PER_KIND, len(correct))} correctly "
        f"(✓) and {min(GRADCAM_PER_KIND, len(wrong))} wrongly (✗) classified frames, the most confident of each kind "
        f"spread over the classes. The evaluation saves no fine-tuned models, so the classifier is a linear head "
        f"(logistic regression) fitted here on frozen features of {len(np.unique(data.videos[train]))} labelled videos "
        f"and applied to frames of {len(np.unique(data.videos[test]))} other videos (grouped split, frame accuracy "
        f"{100 * accuracy:.0f} %). Bright = the regions that raise the predicted class's score. At {encoder.size} px "
        f"layer4 is a {grid[0]}×{grid[1]} grid, which sets how coarse the maps are.",
    )
    if min(grid) < 3:
        section.note(
            f"At this input size ({encoder.size} px) layer4 has only {grid[0]}×{grid[1]} cells: the maps are "
            "nearly uniform and say little about where the encoder looks."
        )
    if not len(wrong):
        section.note("Every held-out frame was classified correctly: no wrong examples to show.")


def _spread(indices: np.ndarray, truth: np.ndarray, confidence: np.ndarray, count: int = GRADCAM_PER_KIND) -> list[int]:
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


def _linear_head(classifier: Any, scaler: Any, num_classes: int) -> Any:
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


# ------------------------------------------------------------------------------------------ evaluation


def evaluation_section(path: Path, ctx: Context) -> Section:
    from sonocl.report import figures

    results = _read_json(path / "results.json")
    config = results.get("config", {})
    inits = results.get("inits", [])
    classes = list(results.get("classes", []))
    section = Section(_anchor("eval", path), f"Evaluation: {path.name}")
    section.text(
        f"Store {results.get('store')}: {results.get('num_videos')} videos, {results.get('num_frames')} frames, classes "
        f"{', '.join(classes)}. Protocol {config.get('protocol')}, recipe {config.get('recipe')} ({config.get('epochs')} "
        f"epochs, {config.get('size')} px), {config.get('folds')} folds × {config.get('seeds')} seed(s) grouped by "
        f"{config.get('group_by')}, epoch selection {config.get('selection')}."
    )
    if results.get("optimistic"):
        section.note("Optimistic numbers: each fold reports its best epoch by test accuracy (the papers' selection).")
    runs = config.get("folds", 0) * config.get("seeds", 0)
    rows = []
    for entry in inits:
        cells = [percent(entry.get("summary", {}).get(level, {}).get(key, {})) for _, level, key in METRIC_COLUMNS]
        pooled = [
            f"{100 * entry['pooled'][level]['accuracy']:.1f}"
            for level in ("frame", "video")
            if level in entry.get("pooled", {})
        ]
        rows.append([entry["label"] + (" (optimistic)" if entry.get("optimistic") else ""), *cells, *pooled])
    table = Section(_anchor("table", path), "Comparison table")
    table.table(
        ["init", *[name for name, _, _ in METRIC_COLUMNS], "pooled frame acc", "pooled video acc"],
        rows,
        caption=f"Mean ± std over {runs} fold runs, in %. Pooled = accuracy of the confusion matrix summed over "
        "folds and seeds.",
    )
    section.children.append(table)
    if not inits:
        table.note("results.json lists no inits yet.")
        return section

    confusion = Section(_anchor("confusion", path), "Confusion matrices")
    matrices = [
        (f"{entry['label']}, {level} level", np.asarray(entry["pooled"][level]["confusion"]))
        for entry in inits
        for level in ("frame", "video")
        if level in entry.get("pooled", {})
    ]
    confusion.figure(
        figures.png_bytes(figures.confusion_matrices(matrices, classes)),
        "Pooled over folds (and seeds): rows are the true class, columns the predicted one; each cell "
        "shows the count and the share of its row (the class's recall on the diagonal).",
    )
    section.children.append(confusion)

    folds = Section(_anchor("folds", path), "Per-fold scores")
    scores = {
        entry["label"]: {
            f"{level} accuracy": [
                100 * run[level]["accuracy"]
                for run in entry.get("runs", [])
                if run.get(level, {}).get("accuracy") is not None
            ]
            for level in ("video", "frame")
        }
        for entry in inits
    }
    folds.figure(
        figures.png_bytes(figures.per_fold_scores(scores)),
        "Accuracy of every fold run (folds × seeds) at the video level (mean of the frame probabilities) and "
        "the frame level; the bar is their mean. A wide spread says the table's mean rests on few videos.",
    )
    curves = {
        entry["label"]: [run.get("test_accuracy_by_epoch") or [] for run in entry.get("runs", [])] for entry in inits
    }
    if any(any(r) for r in curves.values()):
        folds.figure(
            figures.png_bytes(figures.accuracy_by_epoch(curves)),
            "Test-fold frame accuracy after each fine-tuning epoch (thin: each fold run; thick: their mean). "
            "Shown for diagnosis only: choosing an epoch from it would select on the test folds.",
        )
    section.children.append(folds)

    roc = Section(_anchor("roc", path), "ROC curves")
    section.children.append(roc)
    predictions = path / "predictions.csv"
    if predictions.is_file():
        per_init = roc_from_predictions(predictions, classes)
        if per_init:
            roc.figure(
                figures.png_bytes(figures.roc_curves(per_init)),
                "Frame-level one-vs-rest ROC from predictions.csv, pooled over folds (and seeds): each test "
                "frame's predicted probability of the class against whether it belongs to it.",
            )
        else:
            roc.note("predictions.csv has no rows with two classes present.")
    else:
        roc.note(f"{predictions} is missing: no ROC curves.")
    return section


def roc_from_predictions(
    path: Path, classes: Sequence[str]
) -> dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]]:
    """Per init, per class present among the labels: (class, fpr, tpr, AUC) from ``predictions.csv``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out: dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]] = {}
    for init in dict.fromkeys(row["init"] for row in rows):
        chosen = [row for row in rows if row["init"] == init]
        labels = np.array([row["label"] for row in chosen])
        curves = []
        for name in classes:
            positive = labels == name
            if positive.all() or not positive.any() or f"p_{name}" not in chosen[0]:
                continue
            scores = np.array([float(row[f"p_{name}"]) for row in chosen])
            fpr, tpr, _ = roc_curve(positive, scores)
            curves.append((name, fpr, tpr, float(roc_auc_score(positive, scores))))
        if curves:
            out[init] = curves
    return out


# ---------------------------------------------------------------------------------------- segmentation


def segmentation_section(path: Path, ctx: Context) -> Section:
    from sonocl.report import figures

    results = _read_json(path / "results.json")
    data = results.get("data", {})
    config = results.get("config", {})
    inits = results.get("inits", [])
    section = Section(_anchor("seg", path), f"Segmentation: {path.name}")
    section.text(
        f"{data.get('num_images')} images in {data.get('num_groups')} groups, {config.get('folds')}-fold grouped "
        f"CV, input {config.get('size')} px, {config.get('epochs')} epochs; last-epoch model on each test fold."
    )
    hd = "hd95_mm" if data.get("hd95_unit") == "mm" else "hd95_px"
    header = ["init", "Dice", "IoU", "HD95 (mm)" if hd == "hd95_mm" else "HD95 (px)"]
    has_hc = bool(data.get("hc_available"))
    if has_hc:
        header.append("HC abs. error (mm)")
    rows = []
    for entry in inits:
        summary = entry.get("summary", {})
        cells = [
            entry.get("name"),
            _mean_std(summary.get("dice"), 3),
            _mean_std(summary.get("iou"), 3),
            _mean_std(summary.get(hd), 2),
        ]
        if has_hc:
            cells.append(_mean_std(summary.get("hc_abs_error_mm"), 2))
        rows.append(cells)
    section.table(header, rows, caption="Mean ± std over folds of each fold's mean.")
    if data.get("skipped"):
        section.note(f"{len(data['skipped'])} image(s) were skipped (no usable mask); see results.json.")
    per_fold = {
        entry.get("name"): [
            fold["metrics"]["dice"]["mean"]
            for fold in entry.get("folds", [])
            if fold.get("metrics", {}).get("dice", {}).get("mean") is not None
        ]
        for entry in inits
    }
    if any(per_fold.values()):
        section.figure(
            figures.png_bytes(figures.segmentation_scores(per_fold)),
            "Mean Dice of each test fold (points) and their mean (bar).",
        )
    overlays = Section(_anchor("overlays", path), "Segmentation overlays")
    section.children.append(overlays)
    folders = sorted(p for p in (path / "overlays").glob("*") if p.is_dir()) if (path / "overlays").is_dir() else []
    if not folders:
        overlays.note("No overlays/ folder.")
    for folder in folders:
        pngs = sorted(folder.glob("*.png"))[:SEGMENTATION_OVERLAYS]
        parts = [figure_html(png.read_bytes(), png.stem, f"{folder.name}: {png.stem}") for png in pngs]
        overlays.body.append(f'<h4>{html.escape(folder.name)}</h4><div class="gallery">{"".join(parts)}</div>')
    if folders:
        overlays.text("Ground-truth contour in green, predicted contour in red, at each image's original size.")
    return section


def _mean_std(stats: dict[str, Any] | None, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {(stats.get('std') or 0):.{digits}f}"


# --------------------------------------------------------------------------------------------- command


def build_report(paths: Sequence[Path], out: Path, ctx: Context | None = None, title: str | None = None) -> Path:
    """Write the report of ``paths`` to ``out`` (atomically) and return ``out``."""
    from sonocl.data.store import atomic_write_text

    ctx = ctx or Context()
    kinds = [(Path(p), classify_path(Path(p))) for p in paths]
    builders = {"run": run_section, "evaluation": evaluation_section, "segmentation": segmentation_section}
    sections = [builders[kind](path, ctx) for path, kind in kinds]
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    intro = [
        f"sonocl {__version__}, {created}. Inputs: " + "; ".join(f"{kind} {path.resolve()}" for path, kind in kinds)
    ]
    page = render_page(title or "sonocl report: " + ", ".join(path.name for path, _ in kinds), intro, sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="pretraining run directory, `sonocl evaluate` or `sonocl segment` output (any number)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="HTML file to write (default: %(default)s)"
    )
    parser.add_argument("--title", help="page title (default: the inputs' names)")
    parser.add_argument(
        "--max-points",
        type=int,
        default=MAX_MAP_POINTS,
        help="frames in the embedding map and the Grad-CAM pool (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the map and the frame subsampling (default: 0)")
    parser.add_argument("--device", default="cpu", help="device for the encoder passes (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    ctx = Context(device=args.device, seed=args.seed, max_points=args.max_points)
    started = time.perf_counter()
    try:
        out = build_report(args.paths, args.out, ctx, args.title)
    except ReportError as error:
        print(f"sonocl report: error: {error}", file=sys.stderr)
        return 2
    size = out.stat().st_size / 1e6
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in ctx.timings.items())
    print(
        f"sonocl report: wrote {out} ({size:.1f} MB, {time.perf_counter() - started:.0f} s{': ' + parts if parts else ''})",
        file=sys.stderr,
    )
    return 0
