"""The model card of a `sonocl export` bundle: ``README.md`` with the YAML front matter the Hugging Face Hub reads.

`model_card` renders it from ``sonocl_encoder.json``'s content alone (`sonocl.export.bundle_metadata`), so the card
and the JSON cannot disagree: what the encoder is, how to load it (timm, torchvision for a ResNet, sonocl), its
training data (the run's provenance), training budget, the evaluation of ``--eval``, intended use and limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sonocl.evaluate.metrics import percent
from sonocl.provenance import BUNDLE_FILE, PROVENANCE_FILE

EVALUATION_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
    ("macro_auc", "macro AUC"),
)
"""``results.json`` summary keys shown in the card, with their names for a reader."""
_GROUPED_BY = {"group": "patient (the store's group)", "video": "video"}


def _evaluation_section(evaluation: Mapping[str, Any] | None) -> list[str]:
    if evaluation is None:
        return [
            "Not evaluated in this bundle. Measure it on your own labelled videos against random init:",
            "",
            "```bash",
            "sonocl evaluate --store STORE --init random --init DIR --protocol last-block --folds 5 --out eval",
            "```",
            "",
            "and export again with `--eval eval` to record the result here.",
        ]
    runs = (evaluation.get("folds") or 0) * (evaluation.get("seeds") or 0)
    selection = evaluation.get("selection")
    grouping = _GROUPED_BY.get(str(evaluation.get("group_by")), evaluation.get("group_by"))
    classes = ", ".join(map(str, evaluation.get("classes", [])))
    lines = [
        f"`sonocl evaluate` ({evaluation['results']}), protocol **{evaluation.get('protocol')}**, "
        f"{evaluation.get('folds')} folds grouped by {grouping} × {evaluation.get('seeds')} seed(s) = {runs} fold "
        f"runs, {evaluation.get('num_videos')} videos of {classes}, model selection `{selection}`.",
    ]
    if evaluation.get("optimistic"):
        lines.append("**Optimistic: the epoch was selected on the test fold (`max-test`), as the papers did.**")
    lines += [
        "",
        "Video-level test scores, mean ± std over the fold runs (%):",
        "",
        "| init | " + " | ".join(name for _, name in EVALUATION_METRICS) + " |",
        "|---|" + "---|" * len(EVALUATION_METRICS),
    ]
    for entry in evaluation["inits"]:
        video = entry.get("summary", {}).get("video", {})
        label = f"**{entry['label']} (this encoder)**" if entry["this_encoder"] else str(entry["label"])
        lines.append(f"| {label} | " + " | ".join(percent(video.get(key)) for key, _ in EVALUATION_METRICS) + " |")
    inputs = [
        f"{entry['label']} {put['size']} px, (x - {put['mean']:.3g}) / {put['std']:.3g} ({put.get('source', '')})"
        for entry in evaluation["inits"]
        if (put := entry.get("input"))
    ]
    if inputs:
        lines += ["", "Input of each init: " + "; ".join(inputs) + "."]
    notes = [
        f"- {entry['label']}: {entry['pretraining_overlap']}"
        for entry in evaluation["inits"]
        if entry["pretraining_overlap"]
    ]
    return lines + (["", "Overlap of the test videos with pretraining:", "", *notes] if notes else [])


def _provenance_section(metadata: Mapping[str, Any]) -> list[str]:
    if metadata["provenance"] is None:
        return [
            f"Frame store `{metadata['store']}`. The run recorded no `{PROVENANCE_FILE}` (runs of sonocl before "
            "provenance recording), so which videos it trained on is not part of this bundle."
        ]
    lines = [f"From the run's `{PROVENANCE_FILE}` (whole in `{BUNDLE_FILE}`, key `provenance`; lists as counts):", ""]
    summary = metadata["provenance_summary"]
    lines += [
        f"- {key.replace('_', ' ')}: {', '.join(map(str, value)) or 'none' if isinstance(value, list) else value}"
        for key, value in summary.items()
    ]
    return lines


def _budget_lines(budget: Mapping[str, Any]) -> list[str]:
    wall = budget.get("wall_seconds")
    selected = (
        f" (selected by held-out loss at step {budget['steps']} of {budget['run_steps']})"
        if budget["run_steps"] != budget["steps"]
        else ""
    )
    lines = [
        f"- {budget['steps']} optimiser steps{selected}: {budget['epochs']} of {budget['epochs_planned']} planned "
        f"epochs × {budget['steps_per_epoch']} steps, global batch {budget['batch_size']} "
        f"({budget['processes']} process{'es' if budget['processes'] != 1 else ''})",
        f"- {budget['pairs_seen']:,} positive pairs seen ({budget['views_seen']:,} augmented views)",
    ]
    if wall is not None:
        lines.append(f"- training wall time {wall / 60:.1f} min")
    monitors = budget.get("monitors") or {}
    if monitors:
        lines.append(
            "- monitors at that checkpoint (held-out videos): "
            + ", ".join(f"{name} {value:.4f}" for name, value in monitors.items())
        )
    return lines


def model_card(metadata: Mapping[str, Any]) -> str:
    """``README.md``, written from ``sonocl_encoder.json``'s content only, with the Hub's YAML front matter."""
    arch, method, channels = metadata["arch"], metadata["method"], metadata["channels"]
    size = metadata["input"]["size"]
    config = metadata["pretrain_config"]
    optim = config.get("optim") or {}
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        *(f"- {tag}" for tag in ("sonocl", "ultrasound", "self-supervised", method)),
        "---",
        "",
        f"# {method} {arch} ultrasound encoder",
        "",
        f"A {arch} image encoder pretrained by sonocl {metadata['sonocl_version']} with **{method}** (self-supervised "
        f"pretraining on ultrasound videos). It maps a {size}×{size} greyscale frame to a {metadata['feature_dim']}-d "
        f"feature (the pooled output of the backbone; no classification head). Exported {metadata['created']} from "
        f"`{metadata['source_run']}`.",
        "",
        *_loading_section(metadata),
        f"With sonocl (the stem it was trained with, {channels} channel{'s' if channels != 1 else ''}; same features):",
        "",
        "```python",
        "import sonocl",
        'encoder = sonocl.load_encoder("DIR")  # this folder',
        "```",
        "",
        "or `sonocl evaluate --init DIR`, `sonocl segment --init DIR`, `sonocl embed --init DIR` with the "
        "normalisation and size read from the file.",
        "",
        "## Training data",
        "",
        *_provenance_section(metadata),
        "",
        "## Training",
        "",
        f"- method `{method}`, {arch}, {channels}-channel stem, {size} px, seed {config.get('seed')}, "
        f"optimiser {optim.get('name')} (lr {optim.get('lr')}, weight decay {optim.get('weight_decay')})",
        *_budget_lines(metadata["budget"]),
        f"- the whole resolved configuration: `{BUNDLE_FILE}`, key `pretrain_config`",
        "",
        "## Evaluation",
        "",
        *_evaluation_section(metadata["evaluation"]),
        "",
        "## Intended use",
        "",
        "Research: an initialisation for ultrasound image classification or segmentation models that are then "
        "fine-tuned and validated on the user's own data, and a feature extractor for analysis (`sonocl embed`). "
        "It is not a diagnostic tool and has not been validated for any clinical decision.",
        "",
        "## Limits",
        "",
        "- It has only seen the videos described under Training data: other scanners, probes, presets, anatomy or "
        "patient groups can shift its features; check on your data against random (and ImageNet) init.",
        f"- Features are defined for greyscale frames at the training normalisation; at sizes far from {size} px they "
        "change.",
        "- Self-supervised pretraining on videos that are later test videos (transductive), or a method that used "
        "their labels (USCL's semi-supervised head, AWCL's anatomy labels), makes an evaluation on those videos "
        "optimistic: compare the test videos' hashes with the provenance above.",
        "- The scores above hold for their store, protocol and split only; their spread over folds is part of the "
        "result.",
        "",
    ]
    return "\n".join(lines)


def _loading_section(metadata: Mapping[str, Any]) -> list[str]:
    """How to load the bundle without sonocl: timm (every backbone), torchvision (a ResNet)."""
    from sonocl.backbones import Backbone

    arch, size, features = metadata["arch"], metadata["input"]["size"], metadata["feature_dim"]
    mean, std, stem = metadata["input"]["mean"], metadata["input"]["std"], metadata["weights"]["stem_channels"]
    grey = "the grey frame (pixel / 255)" + (f" copied to the {stem} channels" if stem > 1 else "")
    lines = [
        "## Load it",
        "",
        "With timm (no sonocl needed):",
        "",
        "```python",
        "import timm",
        'encoder = timm.create_model("local-dir:DIR", pretrained=True)  # DIR: this folder',
        "```",
        "",
    ]
    if Backbone.named(arch).is_resnet:
        lines += [
            "Plain PyTorch / torchvision:",
            "",
            "```python",
            "import torch, torchvision, safetensors.torch",
            f"encoder = torchvision.models.{arch}(); encoder.fc = torch.nn.Identity()",
            f'encoder.load_state_dict(safetensors.torch.load_file("DIR/{metadata["weights"]["file"]}"))',
            "```",
            "",
        ]
    return [
        *lines,
        f"Input: a `(N, {stem}, {size}, {size})` float tensor, {grey}, normalised as `(x - {mean}) / {std}`. Output: "
        f"`(N, {features})` features.",
        "",
    ]
