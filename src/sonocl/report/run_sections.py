"""The run's part of the `sonocl report` page, a `page.Section` of what `analysis` computes and `figures` draws:
settings, training curves, the pair gallery, CMW-Net weights (Meta-USCL), the embedding map, Grad-CAM.

`Context` holds the options these builders share and the time each part took.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.errors import UserError
from sonocl.methods import get_method
from sonocl.report import analysis
from sonocl.report.analysis import GALLERY_PAIRS, GRADCAM_PER_KIND, MAX_MAP_POINTS
from sonocl.report.inputs import ReportError, open_store, read_metrics
from sonocl.report.page import Section, anchor


@dataclass
class Context:
    """Options shared by the section builders."""

    device: str = "cpu"
    seed: int = 0
    max_points: int = MAX_MAP_POINTS
    timings: dict[str, float] = field(default_factory=dict)


def _left_out(section: Section, problem: str, without: str) -> None:
    """A damaged run file: the report goes on without it, says so in ``section`` and in one line on stderr."""
    section.note(f"{problem}; {without}.")
    print(f"sonocl report: {problem}; the report shows the run without it ({without})", file=sys.stderr)


def run_section(path: Path, ctx: Context) -> Section:
    from sonocl.train.config import ConfigError, load_run_config

    section = Section(anchor("run", path), f"Pretraining run: {path.name}")
    cfg = None
    if (path / "config.yaml").is_file():
        try:
            cfg = load_run_config(path / "config.yaml")  # as --resume and export read it
        except ConfigError as error:
            _left_out(section, str(error), "only the logged metrics are shown")
    if cfg is not None:
        section.table(["setting", "value"], _settings_rows(cfg), caption=f"{path / 'config.yaml'}")

    steps: dict[str, np.ndarray] = {}
    epochs: dict[str, np.ndarray] = {}
    if (path / "metrics.csv").is_file():
        try:
            steps, epochs = read_metrics(path / "metrics.csv")
        except (UnicodeDecodeError, csv.Error) as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else " ".join(str(error).split())
            _left_out(section, f"{path / 'metrics.csv'}: the run's log is damaged ({reason})", "no training curves")
        else:
            section.children.append(_training_section(path, steps, epochs))
    else:
        section.note(f"{path / 'metrics.csv'} is missing: no training curves.")

    store = None
    store_problem = ""
    if cfg is not None:
        try:
            store = open_store(cfg.store, path, cfg.store_weights)
        except ReportError as error:
            store_problem = str(error)
    else:
        store_problem = "no config.yaml, so the store is unknown"

    gallery = Section(anchor("pairs", path), "Positive pairs as the sampler and the augmentation make them")
    section.children.append(gallery)
    if store is None:
        gallery.note(f"Skipped: {store_problem}.")
    else:
        _timed(ctx, "pairs", lambda: _pair_gallery(gallery, cfg, store))

    if cfg is not None and get_method(cfg.method).learns_pair_weights:
        cmw = Section(anchor("cmw", path), "Meta-USCL: CMW-Net pair weights")
        section.children.append(cmw)
        _timed(ctx, "cmw", lambda: _cmw_section(cmw, path, cfg, store, store_problem, steps))

    embedding = Section(anchor("embedding", path), "Embedding map")
    gradcam = Section(anchor("gradcam", path), "Grad-CAM: what the encoder looks at")
    section.children += [embedding, gradcam]
    if store is None:
        for part in (embedding, gradcam):
            part.note(f"Skipped: {store_problem}.")
        return section
    try:
        from sonocl.report.embed import load_encoder_for_features

        encoder = load_encoder_for_features(str(path))
    except (OSError, ValueError, RuntimeError, UserError) as error:
        for part in (embedding, gradcam):
            part.note(f"Skipped: the run's encoder cannot be loaded ({error}).")
        print(f"sonocl report: {error}; the report shows the run without its encoder's parts", file=sys.stderr)
        return section
    features = _timed(
        ctx, "features", lambda: analysis.encoder_features(encoder, store, ctx.max_points, ctx.seed, ctx.device)
    )
    _timed(
        ctx,
        "embedding",
        lambda: _embedding_section(embedding, features, store, ctx, f"the run's encoder ({path.name})"),
    )
    _timed(ctx, "gradcam", lambda: _gradcam_section(gradcam, encoder, features, store, ctx))
    return section


def _settings_rows(cfg: Any) -> list[tuple[str, Any]]:
    """The run's main settings, one (name, value) row each."""
    return [
        ("method", cfg.method),
        ("store", ", ".join(cfg.store)),
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
    ]


def _timed(ctx: Context, name: str, work: Any) -> Any:
    started = time.perf_counter()
    try:
        return work()
    finally:
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - started


def _training_section(path: Path, steps: dict[str, np.ndarray], epochs: dict[str, np.ndarray]) -> Section:
    from sonocl.report import figures

    section = Section(anchor("curves", path), "Training curves")
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
        cells: list[tuple[str, int | str]] = [("epoch", int(last.get("epoch", 0)))]
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

    from sonocl.report import figures

    try:
        gallery = analysis.gallery_pairs(cfg, store, GALLERY_PAIRS)
    except analysis.Skipped as skipped:
        section.note(f"Skipped: {skipped}")
        return
    batch, shown = gallery.batch, len(gallery.batch)
    items = []
    for b in range(shown):
        frames = batch.frames[b]
        video = store.videos[int(batch.video[b])]
        items.append(
            {
                "sources": [store.frame(int(f)) for f in frames],
                "source_titles": [
                    f"f{j + 1}: frame {int(store.frame_in_video[f])}\nt = {store.frame_time[f]:.2f} s"
                    for j, f in enumerate(frames)
                ],
                "views": list(gallery.views[b]),
                "view_titles": [f"view {v + 1} = " + _mix_text(batch.mix[b, v]) for v in range(2)],
                "title": f"{video.id}\n({video.label or 'unlabelled'})",
            }
        )
    order = (
        "each frame augmented, then mixed (shared frames get one draw)"
        if batch.augment_first
        else "frames mixed, then each view augmented independently"
    )
    section.figure(
        figures.png_bytes(figures.pair_gallery(items)),
        f"{cfg.method}: the first {shown} of the {gallery.total} pairs of training step 1 (epoch 1, seed {cfg.seed}), "
        f"re-created with the run's sampler and augmentation ({order}) and the step's augmentation seed. Left: the "
        f"source frames f1…fk at the store's {store.size} px with their position in the video; right: the two views "
        f"at {cfg.size} px as the encoder sees them (de-normalised for display), with the mixing weights.",
    )
    if torch.cuda.is_available():
        section.note(
            "Drawn on the CPU: a run trained on a GPU drew its augmentation from the GPU's generator, so the "
            "crops and jitter here are from the same distribution but not the identical draw."
        )


def _mix_text(weights: np.ndarray) -> str:
    terms = [f"{w:.2f}·f{j + 1}" for j, w in enumerate(weights) if abs(w) > 1e-6]
    return " + ".join(terms) if terms else "0"


def _cmw_section(
    section: Section, path: Path, cfg: Any, store: Any, store_problem: str, steps: dict[str, np.ndarray]
) -> None:
    from sonocl.report import figures

    if _has(steps, "part_weight_mean"):
        epoch, mean, std = analysis.per_epoch_mean(
            steps["epoch"], steps["part_weight_mean"], steps.get("part_weight_std")
        )
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
    results = analysis.cmw_weights_of_checkpoints(checkpoints, cfg, store)
    if not results:
        section.note("Per-pair weights skipped: the checkpoints hold no CMW-Net.")
        return
    histograms = {f"after epoch {r.epoch} ({r.checkpoint.name})": r.weight for r in results}
    scatter = results[0]
    section.figure(
        figures.png_bytes(figures.weight_histograms(histograms)),
        f"Computed here, not logged: the CMW-Net of each checkpoint weighs {len(scatter.weight)} pairs of "
        "the epoch it ended (the run's sampler, augmentation and step seeds; backbone in training mode as in "
        "the step, nothing updated). Only the checkpoints' epochs are available.",
    )
    section.figure(
        figures.png_bytes(figures.weight_vs_cosine(scatter.cosine, scatter.weight, scatter.label, scatter.class_names)),
        f"Each pair's weight (CMW-Net after epoch {scatter.epoch}) against the cosine similarity of the "
        "backbone features h of its two views (the CMW-Net's input), coloured by the video's class.",
    )


def _has(columns: dict[str, np.ndarray], key: str) -> bool:
    return key in columns and bool(np.isfinite(columns[key]).any())


# --------------------------------------------------------------------------- embedding map and Grad-CAM


def _embedding_section(section: Section, data: analysis.FrameFeatures, store: Any, ctx: Context, source: str) -> None:
    from sonocl.report import figures

    if len(data.frames) < 5:
        section.note(f"Skipped: only {len(data.frames)} frames.")
        return
    maps = analysis.embedding_maps(data, ctx.seed)
    for name, xy in maps:
        section.figure(
            figures.png_bytes(figures.embedding_map(xy, data.labels, data.class_names, data.videos, name)),
            f"{name} of the backbone features h (L2-normalised) of {len(data.frames)} frames (evenly spaced, at most "
            f"{analysis.frames_per_video(store, ctx.max_points)} per video) of {len(np.unique(data.videos))} videos "
            f"from {source}. Left: by class; right: by video. Frames of one video clustering apart from their class "
            "means the encoder tells videos apart more than classes.",
        )
    if len(maps) == 1:
        section.note("UMAP is not installed (pip install umap-learn); t-SNE only.")


def _gradcam_section(section: Section, encoder: Any, data: analysis.FrameFeatures, store: Any, ctx: Context) -> None:
    """Grad-CAM of a linear head fitted on frozen features of some videos, on frames of the others
    (`analysis.gradcam_probe`), with what the head is."""
    from sonocl.report import figures

    try:
        probe = analysis.gradcam_probe(encoder, data, store, ctx.seed)
    except analysis.Skipped as skipped:
        section.note(f"Skipped: {skipped}")
        return
    items = []
    for example in probe.examples:
        video = store.videos[int(store.frame_video[example.frame])]
        mark = "✓" if example.correct else "✗"
        items.append(
            {
                "image": example.image,
                "cam": example.cam,
                "title": f"{mark} true {data.class_names[example.truth]}, predicted "
                f"{data.class_names[example.predicted]} ({100 * example.confidence:.0f} %)\n{video.id} frame "
                f"{int(store.frame_in_video[example.frame])}",
            }
        )
    grid = probe.grid
    section.figure(
        figures.png_bytes(figures.gradcam_grid(items)),
        f"Grad-CAM on {probe.layer} for the predicted class, {min(GRADCAM_PER_KIND, probe.correct)} correctly "
        f"(✓) and {min(GRADCAM_PER_KIND, probe.wrong)} wrongly (✗) classified frames, the most confident of each "
        f"kind spread over the classes. The evaluation saves no fine-tuned models, so the classifier is a linear head "
        f"(logistic regression) fitted here on frozen features of {probe.train_videos} labelled videos "
        f"and applied to frames of {probe.test_videos} other videos (grouped split, frame accuracy "
        f"{100 * probe.accuracy:.0f} %). Bright = the regions that raise the predicted class's score. At "
        f"{encoder.size} px {probe.layer} is a {grid[0]}×{grid[1]} grid, which sets how coarse the maps are.",
    )
    if min(grid) < 3:
        section.note(
            f"At this input size ({encoder.size} px) {probe.layer} has only {grid[0]}×{grid[1]} cells: the maps are "
            "nearly uniform and say little about where the encoder looks."
        )
    if not probe.wrong:
        section.note("Every held-out frame was classified correctly: no wrong examples to show.")
