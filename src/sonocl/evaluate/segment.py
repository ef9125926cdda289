"""`sonocl segment`: U-Net segmentation on a pretrained ResNet encoder, grouped k-fold cross-validation.

For each ``--init`` and each fold: a fresh encoder (`sonocl.evaluate.inits.load_init`) under a U-Net decoder
(`sonocl.evaluate.unet`) is trained on the training folds for ``--epochs`` epochs (Adam, cosine schedule,
Dice + BCE, joint image + mask augmentation) and the model of the **last** epoch predicts the test fold; no
choice is made on the test fold. Images and masks are squashed to ``--size``² for the network; predicted
probabilities are resized back to each image's original size, thresholded at 0.5 and scored there against
the original mask (`sonocl.evaluate.segmentation_metrics`). See docs/segment.md.

Exit status: 0 done; 2 nothing was run (bad arguments, no images, images without a usable mask unless
``--skip-bad-masks``); 3 done, but some images were skipped (listed in results.json).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from sonocl.data.splits import grouped_stratified_kfold
from sonocl.evaluate import segmentation_metrics as sm
from sonocl.evaluate.inits import default_label, load_init
from sonocl.evaluate.masks import MaskError, MaskPair, pair_images, read_grey, read_mask
from sonocl.evaluate.unet import JointAugment, UNet, dice_bce_loss
from sonocl.models import WeightsError
from sonocl.progress import progress_report

SCHEMA = "sonocl.segment/1"
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3
METRICS = ("dice", "iou", "hd95_px", "hd95_mm", "hc_abs_error_mm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    data.add_argument("--masks", type=Path, default=None,
                      help="folder of masks: a parallel tree, or the image folder itself (default: --images)")
    data.add_argument("--group-regex", default=None,
                      help="regex on each image's relative path without extension; its first group (else the whole "
                           "match) is the group id, e.g. '^(\\d+)' for HC18. Default: every image is its own group")
    data.add_argument("--pixel-size", type=Path, default=None,
                      help="CSV with 'filename', 'pixel size(mm)' and optionally 'head circumference (mm)' (HC18): "
                           "HD95 in mm and the head-circumference error")
    data.add_argument("--skip-bad-masks", action="store_true",
                      help="run without the images whose mask is missing or mis-sized (listed; exit 3) instead of stopping")
    model = parser.add_argument_group("model")
    model.add_argument("--init", nargs="+", action="extend", required=True,
                       help="random | imagenet | a sonocl run directory, checkpoint or encoder.safetensors | a USCL/Meta-USCL file; "
                            "several give one comparison table")
    model.add_argument("--name", nargs="+", action="extend", default=None, help="table label of each --init (default: derived)")
    model.add_argument("--backbone", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    model.add_argument("--channels", type=int, default=1, choices=(1, 3), help="stem channels (grey is copied to 3)")
    model.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (encoder frozen, BN in eval mode)")
    model.add_argument("--mean", type=float, default=None,
                       help=f"normalisation mean of [0, 1] pixels (default: the encoder file's, else {DEFAULT_MEAN})")
    model.add_argument("--std", type=float, default=None, help=f"normalisation std (default: the encoder file's, else {DEFAULT_STD})")
    train = parser.add_argument_group("training")
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--size", type=int, default=128, help="square network input; masks are scored at the original size")
    train.add_argument("--epochs", type=int, default=8)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0 over the run)")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--seed", type=int, default=0, help="folds, initialisation and augmentation")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, type=Path, help="output folder (results.json, results.md, per_image.csv, overlays/)")
    output.add_argument("--overlays", type=int, default=6, help="overlay PNGs per init (the first N images by name)")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
    return device


def image_groups(relatives: list[str], regex: str | None) -> list[str]:
    """The group id of each image: the regex's first group (else whole match) on its relative name, else the name."""
    if regex is None:
        return list(relatives)
    pattern = re.compile(regex)
    groups, unmatched = [], []
    for relative in relatives:
        match = pattern.search(relative)
        if match is None:
            unmatched.append(relative)
            continue
        groups.append(match.group(1) if pattern.groups else match.group(0))
    if unmatched:
        raise ValueError(
            f"--group-regex {regex!r} does not match {len(unmatched)} image name(s), e.g. {unmatched[:3]}; "
            "it is searched in the path relative to --images, without extension"
        )
    return groups


def read_pixel_sizes(path: Path) -> dict[str, dict[str, float]]:
    """HC18-style CSV → {file name: {"pixel_size_mm": …, "hc_mm": … (when given)}}, keyed by name and by stem."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        name_column = next((columns[c] for c in columns if c in ("filename", "file", "image", "name")), None)
        size_column = next((columns[c] for c in columns if "pixel" in c and "size" in c), None)
        hc_column = next((columns[c] for c in columns if "circumference" in c or c in ("hc", "hc_mm")), None)
        if name_column is None or size_column is None:
            raise ValueError(
                f"{path}: needs a 'filename' column and a 'pixel size(mm)' column, found {reader.fieldnames}"
            )
        table: dict[str, dict[str, float]] = {}
        for row in reader:
            entry = {"pixel_size_mm": float(row[size_column])}
            if hc_column is not None and row[hc_column].strip():
                entry["hc_mm"] = float(row[hc_column])
            name = row[name_column].strip()
            table[name] = entry
            table.setdefault(Path(name).stem, entry)
    return table


def _encoder_normalisation(metadata: dict[str, Any]) -> tuple[float | None, float | None]:
    def scalar(value: Any) -> float | None:
        if value is None:
            return None
        values = value if isinstance(value, (list, tuple)) else [value]
        return float(np.mean([float(v) for v in values]))

    return scalar(metadata.get("mean")), scalar(metadata.get("std"))


def _load_dataset(pairs: list[MaskPair], size: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Images (N, 1, S, S) uint8 and masks (N, 1, S, S) uint8 {0, 1} squashed to S², and each original (H, W)."""
    images = np.empty((len(pairs), 1, size, size), dtype=np.uint8)
    masks = np.empty((len(pairs), 1, size, size), dtype=np.uint8)
    shapes = []
    with progress_report(len(pairs), "loading", "image", leave=False) as bar:
        for i, pair in enumerate(pairs):
            grey = read_grey(pair.image)
            mask = read_mask(pair.masks)
            shapes.append(grey.shape)
            images[i, 0] = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
            masks[i, 0] = np.asarray(resized) > 127
            bar.update(1)
    return torch.from_numpy(images), torch.from_numpy(masks), shapes


def _normalise(images_u8: torch.Tensor, mean: float, std: float, channels: int) -> torch.Tensor:
    x = (images_u8.float() / 255.0 - mean) / std
    return x.expand(-1, channels, -1, -1) if channels != 1 else x


def train_fold(
    model: UNet,
    images: torch.Tensor,
    masks: torch.Tensor,
    args: argparse.Namespace,
    mean: float,
    std: float,
    device: torch.device,
    generator: torch.Generator,
    description: str,
) -> float:
    """Train ``model`` on uint8 images/masks (N, 1, S, S) on the CPU; returns the last epoch's mean loss."""
    if args.freeze_encoder:
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
    n = images.shape[0]
    batches_per_epoch = n // args.batch_size + (1 if n % args.batch_size >= 2 else 0)  # a batch of 1 breaks BatchNorm
    if batches_per_epoch == 0:
        raise ValueError(f"{n} training image(s): BatchNorm needs at least 2 per batch")
    total_steps = args.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    augment = JointAugment(args.size)
    epoch_loss = float("nan")
    with progress_report(total_steps, description, "step") as bar:
        for epoch in range(args.epochs):
            model.train()
            if args.freeze_encoder:
                model.encoder.eval()
            order = torch.randperm(n, generator=generator)
            losses = []
            for step in range(batches_per_epoch):
                index = order[step * args.batch_size:(step + 1) * args.batch_size]
                x = images[index].to(device).float().div_(255.0)
                y = masks[index].to(device).float()
                x, y = augment(x, y, generator)
                x = (x - mean) / std
                if args.channels != 1:
                    x = x.expand(-1, args.channels, -1, -1)
                loss = dice_bce_loss(model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{description}: non-finite loss at epoch {epoch + 1}, step {step + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.set_postfix(epoch=f"{epoch + 1}/{args.epochs}", loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update(1)
            epoch_loss = float(np.mean(losses))
    return epoch_loss


@torch.no_grad()
def predict(
    model: UNet, images: torch.Tensor, mean: float, std: float, channels: int, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Foreground probabilities (N, 1, S, S) on the CPU for uint8 images (N, 1, S, S)."""
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = _normalise(images[start:start + batch_size].to(device), mean, std, channels)
        outputs.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(outputs)


def to_original_size(probability: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(1, S, S) probability → bool (H, W): bilinear resize to the original size, then > 0.5."""
    resized = F.interpolate(probability[None], size=shape, mode="bilinear", align_corners=False)[0, 0]
    return (resized > 0.5).numpy()


def score_image(prediction: np.ndarray, truth: np.ndarray, pixel: dict[str, float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "dice": sm.dice(prediction, truth),
        "iou": sm.iou(prediction, truth),
        "hd95_px": sm.hd95(prediction, truth),
        "hd95_mm": float("nan"),
        "pred_area_px": int(prediction.sum()),
        "true_area_px": int(truth.sum()),
        "pixel_size_mm": float("nan"),
        "hc_true_mm": float("nan"),
        "hc_pred_mm": float("nan"),
        "hc_abs_error_mm": float("nan"),
        "hc_fit_on_truth_mm": float("nan"),
    }
    if pixel is not None:
        spacing = pixel["pixel_size_mm"]
        row["pixel_size_mm"] = spacing
        row["hd95_mm"] = row["hd95_px"] * spacing
        row["hc_pred_mm"] = sm.head_circumference(prediction, spacing)
        row["hc_fit_on_truth_mm"] = sm.head_circumference(truth, spacing)
        if "hc_mm" in pixel:
            row["hc_true_mm"] = pixel["hc_mm"]
            # an empty prediction has no circumference: count it as the whole circumference missed
            predicted = row["hc_pred_mm"] if math.isfinite(row["hc_pred_mm"]) else 0.0
            row["hc_abs_error_mm"] = abs(predicted - pixel["hc_mm"])
    return row


def write_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> None:
    """The grey image with the ground-truth contour in green and the predicted contour in red (2 px wide)."""
    rgb = np.repeat(image[..., None], 3, axis=2).copy()
    for mask, colour in ((truth, (0, 255, 0)), (prediction, (255, 0, 0))):
        contour = ndimage.binary_dilation(sm.boundary(mask), iterations=1)
        rgb[contour] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"


def _fold_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {metric: sm.summarize([row[metric] for row in rows]) for metric in METRICS}


def _across_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± std over folds of each fold's mean."""
    summary = {}
    for metric in METRICS:
        means = [fold["metrics"][metric]["mean"] for fold in folds]
        summary[metric] = sm.summarize([np.nan if m is None else m for m in means])
    return summary


def _format(summary: dict[str, Any], digits: int) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    hd_metric = "hd95_mm" if results["data"]["hd95_unit"] == "mm" else "hd95_px"
    hd_label = "HD95 (mm)" if hd_metric == "hd95_mm" else "HD95 (px)"
    has_hc = results["data"]["hc_available"]
    header = ["init", "Dice", "IoU", hd_label] + (["HC abs. error (mm)"] if has_hc else [])
    lines = [
        f"# sonocl segment — {results['config']['folds']}-fold grouped CV, {results['data']['num_images']} images, "
        f"{results['data']['num_groups']} groups",
        "",
        "Mean ± std (sample, ddof=1) over folds of each fold's mean; last-epoch model, no selection on the test fold.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for init in results["inits"]:
        s = init["summary"]
        cells = [init["name"], _format(s["dice"], 3), _format(s["iou"], 3), _format(s[hd_metric], 2)]
        if has_hc:
            cells.append(_format(s["hc_abs_error_mm"], 2))
        lines.append("| " + " | ".join(cells) + " |")
    folds = results["config"]["folds"]
    lines += ["", "Dice per fold:", "", "| init | " + " | ".join(f"fold {k + 1}" for k in range(folds)) + " | pooled (images) |",
              "|---|" + "---|" * (folds + 1)]
    for init in results["inits"]:
        per_fold = [f"{fold['metrics']['dice']['mean']:.3f}" for fold in init["folds"]]
        lines.append(f"| {init['name']} | " + " | ".join(per_fold) + f" | {_format(init['pooled']['dice'], 3)} |")
    config = results["config"]
    lines += [
        "",
        f"Backbone {config['backbone']} ({config['channels']}-channel stem), input {config['size']}², "
        f"{config['epochs']} epochs, batch {config['batch_size']}, Adam lr {config['lr']} (cosine), "
        f"{'frozen' if config['freeze_encoder'] else 'fine-tuned'} encoder, seed {config['seed']}.",
        "Dice/IoU = 1 and HD95 = 0 when prediction and truth are both empty; HD95 = image diagonal when exactly one is.",
    ]
    if has_hc:
        method = results["data"]["hc_fit_on_truth_abs_error_mm"]
        lines.append(
            "HC: ellipse (moments) fitted to the largest predicted component, Ramanujan circumference × pixel size. "
            f"The same fit on the ground-truth masks is off by {_format(method, 2)} mm (the method's own error)."
        )
    if results["data"]["skipped"]:
        lines.append(f"**{len(results['data']['skipped'])} image(s) skipped** (no usable mask): see results.json.")
    path.write_text("\n".join(lines) + "\n")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return clean(value.item())
        return value

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(payload), indent=2) + "\n")
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (MaskError, WeightsError, ValueError) as error:
        print(f"sonocl segment: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    started = time.time()
    names = args.name or [default_label(spec) for spec in args.init]
    if len(names) != len(args.init):
        raise ValueError(f"{len(args.name)} --name for {len(args.init)} --init; give one name per init or none")
    if len(set(names)) != len(names):
        raise ValueError(f"init names must be unique, got {names}; use --name")
    if args.size < 32 or args.epochs < 1 or args.batch_size < 2:
        raise ValueError("--size ≥ 32, --epochs ≥ 1 and --batch-size ≥ 2 are required")
    device = resolve_device(args.device)
    pixel_table = read_pixel_sizes(args.pixel_size) if args.pixel_size else None

    pairing = pair_images(args.images, args.masks)
    for image, message in pairing.errors:
        print(f"sonocl segment: {image}: {message}", file=sys.stderr)
    if pairing.errors and not args.skip_bad_masks:
        raise MaskError(
            f"{len(pairing.errors)} image(s) without a usable mask (listed above); fix them, or pass --skip-bad-masks "
            "to run without them"
        )
    pairs = pairing.pairs
    if not pairs:
        raise MaskError(f"{args.images}: no image with a mask found")
    relatives = [pair.relative for pair in pairs]
    groups = image_groups(relatives, args.group_regex)
    splits = grouped_stratified_kfold(np.zeros(len(pairs), dtype=np.int64), np.asarray(groups), args.folds, args.seed)
    fold_of = np.empty(len(pairs), dtype=np.int64)
    for k, (_, test) in enumerate(splits):
        fold_of[test] = k
    pixel_of = [
        (pixel_table.get(pair.image.name) or pixel_table.get(pair.relative) or pixel_table.get(pair.image.stem))
        if pixel_table is not None else None
        for pair in pairs
    ]
    if pixel_table is not None:
        missing = [pair.image.name for pair, pixel in zip(pairs, pixel_of) if pixel is None]
        if missing:
            print(f"sonocl segment: {len(missing)} image(s) not in {args.pixel_size} (no mm metrics for them), "
                  f"e.g. {missing[:3]}", file=sys.stderr)
    hd95_unit = "mm" if pixel_table is not None and all(p is not None for p in pixel_of) else "px"
    hc_available = pixel_table is not None and any(p is not None and "hc_mm" in p for p in pixel_of)

    images, masks, shapes = _load_dataset(pairs, args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    overlay_set = set(range(min(args.overlays, len(pairs))))

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func",)}
    config["device"] = str(device)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "data": {
            "num_images": len(pairs),
            "num_groups": len(set(groups)),
            "hd95_unit": hd95_unit,
            "hc_available": hc_available,
            "skipped": [{"image": image, "error": message} for image, message in pairing.errors],
            "folds": [
                {"fold": k, "num_train": int(len(train)), "num_test": int(len(test)),
                 "test_images": [relatives[i] for i in test]}
                for k, (train, test) in enumerate(splits)
            ],
        },
        "inits": [],
    }
    per_image_rows: list[dict[str, Any]] = []
    truth_cache: dict[int, np.ndarray] = {}

    for spec, name in zip(args.init, names):
        init_started = time.time()
        _, report = load_init(spec, args.backbone, args.channels)
        meta_mean, meta_std = _encoder_normalisation(report.metadata)
        mean = args.mean if args.mean is not None else (meta_mean if meta_mean is not None else DEFAULT_MEAN)
        std = args.std if args.std is not None else (meta_std if meta_std is not None else DEFAULT_STD)
        print(str(report), file=sys.stderr)
        fold_results = []
        rows_of_init: list[dict[str, Any]] = []
        for k, (train, test) in enumerate(splits):
            torch.manual_seed(args.seed * 1000 + k)
            backbone, _ = load_init(spec, args.backbone, args.channels)
            model = UNet(backbone).to(device)
            generator = torch.Generator().manual_seed(args.seed * 1000 + k)
            fold_started = time.time()
            final_loss = train_fold(
                model, images[train], masks[train], args, mean, std, device, generator,
                description=f"{name} fold {k + 1}/{args.folds}",
            )
            train_seconds = time.time() - fold_started
            probabilities = predict(model, images[test], mean, std, args.channels, device, args.batch_size)
            fold_rows = []
            for j, i in enumerate(test):
                prediction = to_original_size(probabilities[j], shapes[i])
                if i not in truth_cache:
                    truth_cache[i] = read_mask(pairs[i].masks)
                truth = truth_cache[i]
                row = {"init": name, "fold": k, "image": relatives[i], "group": groups[i],
                       "height": shapes[i][0], "width": shapes[i][1]}
                row.update(score_image(prediction, truth, pixel_of[i]))
                fold_rows.append(row)
                if i in overlay_set:
                    write_overlay(args.out / "overlays" / _safe_name(name) / f"{_safe_name(relatives[i])}.png",
                                  read_grey(pairs[i].image), truth, prediction)
            fold_results.append({
                "fold": k, "num_train": int(len(train)), "num_test": int(len(test)),
                "final_train_loss": final_loss, "train_seconds": round(train_seconds, 1),
                "metrics": _fold_summary(fold_rows),
            })
            print(f"{name} fold {k + 1}/{args.folds}: Dice {fold_results[-1]['metrics']['dice']['mean']:.3f}", file=sys.stderr)
            rows_of_init += fold_rows
        per_image_rows += rows_of_init
        results["inits"].append({
            "name": name, "init": spec, "init_report": report.to_dict(), "mean": mean, "std": std,
            "folds": fold_results, "summary": _across_folds(fold_results), "pooled": _fold_summary(rows_of_init),
            "wall_seconds": round(time.time() - init_started, 1),
        })
    if pixel_table is not None:
        method_errors = [
            abs(row["hc_fit_on_truth_mm"] - row["hc_true_mm"]) for row in per_image_rows
            if row["init"] == names[0] and math.isfinite(row["hc_true_mm"])
        ]
        results["data"]["hc_fit_on_truth_abs_error_mm"] = sm.summarize(method_errors)
    results["wall_seconds"] = round(time.time() - started, 1)

    _write_json(args.out / "results.json", results)
    write_markdown(args.out / "results.md", results)
    with open(args.out / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(per_image_rows[0]))
        writer.writeheader()
        for row in per_image_rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    print((args.out / "results.md").read_text())
    return EXIT_SKIPPED if pairing.errors else EXIT_OK
