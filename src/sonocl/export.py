"""`sonocl export RUN --out DIR [--onnx]`: a pretrained encoder as a bundle that travels and describes itself.

The published ultrasound encoders are mostly behind download links that have died, without the code that used
them downstream; what a user can still load years later is a weights file in a standard format beside plain text
that says what it is, in the layout the field's tools read (timm, the Hugging Face Hub). ``DIR`` gets

- ``encoder.safetensors``: a copy of the run's encoder (the backbone of its selected checkpoint, as
  `sonocl.models.save_encoder` writes it: a ResNet's with torchvision key names and a 3-channel stem, so it loads
  into ``torchvision.models.resnet18()`` (or 34/50) as it is; a timm model's with timm's names and its channels);
  its header keeps sonocl's encoder metadata (arch, channels, size, mean, std, method);
- ``config.json``: the model as timm's local-directory and Hub loader read it (architecture, ``num_classes`` 0,
  ``in_chans``, a ViT's ``img_size``, input size, mean and std), so ``timm.create_model("local-dir:DIR",
  pretrained=True)`` is the encoder (timm's ResNets have torchvision's key names);
- ``sonocl_encoder.json`` (schema ``sonocl.encoder/1``): architecture, training channels, normalisation, input
  size, method, the training budget (steps, batch, pairs seen), the run's configuration, the run's data
  provenance (``RUN/provenance.json``, whole, with a count of each list) when the run recorded one, the
  evaluation summary of ``--eval EVAL_DIR`` (``sonocl evaluate``'s ``results.json``), sonocl's version and the
  date; the SHA-256 of the weights file;
- ``README.md``: the model card, with the YAML front matter the Hugging Face Hub reads (library, pipeline, tags):
  the same facts for a reader (rendered from the JSON alone by `sonocl.model_card`, so the two cannot
  disagree), with intended use, limits and how to load the encoder with timm, torchvision (ResNets) and sonocl.
  (Bundles before this were written with ``MODEL_CARD.md``; ``--out`` over one of them replaces it.)
- with ``--onnx``, ``encoder.onnx``: the encoder as an ONNX graph (input ``images`` ``(N, channels, size, size)``,
  any batch; output ``features``), checked against PyTorch with onnxruntime before it is written (extra
  ``sonocl[onnx]``).

The bundle is itself an encoder location: ``sonocl.load_encoder(DIR)``, ``sonocl evaluate --init DIR`` and
``sonocl segment --init DIR`` read ``DIR/encoder.safetensors``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sonocl._version import __version__
from sonocl.errors import UserError
from sonocl.files import read_json, write_json
from sonocl.model_card import model_card
from sonocl.options import load_yaml_text
from sonocl.outputs import BUNDLE, add_overwrite_argument, claim
from sonocl.provenance import BUNDLE_FILE, PROVENANCE_FILE

SCHEMA = "sonocl.encoder/1"
CARD_FILE = "README.md"
TIMM_CONFIG_FILE = "config.json"
ONNX_FILE = "encoder.onnx"
ONNX_TOLERANCE = 1e-4
"""Largest absolute difference between onnxruntime's and PyTorch's features that an exported graph may show."""
_HASH = re.compile(r"[0-9a-f]{64}")


class ExportError(UserError):
    """A run or evaluation directory that cannot be exported; the message names the file and the fix."""


def read_run_config(run: Path) -> dict[str, Any]:
    """``RUN/config.yaml`` as a plain mapping (the resolved configuration every run saves)."""
    path = run / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path}: not found; RUN must be a `sonocl pretrain --out` directory")
    from sonocl.train.config import ConfigError, load_run_config

    try:
        config = load_yaml_text(path.read_text(encoding="utf-8"), str(path))  # no aliases: a YAML bomb never expands
    except UnicodeDecodeError:
        raise ExportError(f"{path}: cannot read the configuration (not UTF-8 text)") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: not a configuration mapping; was it written by `sonocl pretrain`?")
    try:  # a valid configuration, as --resume and report read it: a damaged key is named, never half-used
        load_run_config(path)
    except ConfigError as error:
        raise ExportError(str(error)) from None
    return config


def selected_checkpoint(run: Path, config: Mapping[str, Any]) -> Path:
    """The checkpoint the run's ``encoder.safetensors`` was taken from (`sonocl.models.exported_checkpoint`: the
    loop's rule, as the configuration's ``export`` says)."""
    from sonocl.models import exported_checkpoint

    path = exported_checkpoint(run, str(config.get("export", "best")))
    if path is None:
        raise ExportError(
            f"{run / 'checkpoints'}: no best.pt or last.pt; has `sonocl pretrain --out {run}` run to the end "
            "of an epoch? (`--resume` continues it)"
        )
    return path


def _as_list(value: Any) -> list[str]:
    """A configuration's ``store``: a list of paths (one path in runs of sonocl before several stores)."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _checkpoint_position(path: Path) -> dict[str, Any]:
    """Steps, epochs and monitors of a training checkpoint, without its tensors' meaning."""
    from sonocl.models import read_state_dict

    state = read_state_dict(path)
    return {
        "steps": int(state.get("global_step", 0)),
        "epochs": int(state.get("epoch", 0)),
        "steps_per_epoch": int(state.get("steps_per_epoch", 0)),
        "processes": int(state.get("world_size", 1)),
        "metrics": {k: float(v) for k, v in dict(state.get("metrics") or {}).items()},
    }


def _wall_seconds(run: Path) -> float | None:
    """The training wall time: the ``seconds`` of the last row of ``metrics.csv`` (None without one)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("seconds")]
        return float(rows[-1]["seconds"]) if rows else None
    except (UnicodeDecodeError, csv.Error, ValueError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else " ".join(str(error).split())
        raise ExportError(
            f"{path}: the run's log is damaged ({reason}); restore it, or move it away to export without the "
            "training wall time"
        ) from None


def training_budget(run: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the exported encoder was trained with: optimiser steps, global batch, pairs and views seen, epochs."""
    checkpoint = selected_checkpoint(run, config)
    position = _checkpoint_position(checkpoint)
    last = run / "checkpoints" / "last.pt"
    run_steps = _checkpoint_position(last)["steps"] if last.is_file() and checkpoint != last else position["steps"]
    batch = int(config.get("batch_size", 0))
    return {
        "checkpoint": checkpoint.relative_to(run).as_posix(),
        "steps": position["steps"],
        "epochs": position["epochs"],
        "steps_per_epoch": position["steps_per_epoch"],
        "batch_size": batch,
        "pairs_seen": position["steps"] * batch,
        "views_seen": 2 * position["steps"] * batch,
        "processes": position["processes"],
        "epochs_planned": int(config.get("epochs", 0)),
        "run_steps": run_steps,
        "wall_seconds": _wall_seconds(run),
        "monitors": position["metrics"],
    }


def _summary_value(value: Any) -> Any:
    """A list of content hashes as its length (the record keeps the hashes); names and scalars as they are."""
    if isinstance(value, list) and value and all(isinstance(v, str) and _HASH.fullmatch(v) for v in value):
        return len(value)
    return value


def read_provenance(run: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``RUN/provenance.json`` (`sonocl.provenance`) whole, None when the run recorded none, and its summary: each
    list of video hashes as a count, other values as they are (one level of nesting flattened as ``key.sub``)."""
    from sonocl.provenance import _read as read_provenance_file  # its shape checked, as evaluate's leak guard reads it

    path = run / PROVENANCE_FILE
    if not path.is_file():
        return None, {}
    provenance = read_provenance_file(path)
    summary: dict[str, Any] = {}
    for key, value in provenance.items():
        if isinstance(value, Mapping):
            summary.update({f"{key}.{sub}": _summary_value(v) for sub, v in value.items()})
        elif key != "schema":
            summary[key] = _summary_value(value)
    return provenance, summary


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_this_run(init: str, run: Path) -> bool:
    """Whether an evaluated ``--init`` is this run (its directory, encoder file or one of its checkpoints)."""
    if init in ("random", "imagenet"):
        return False
    candidates = {run, run / "encoder.safetensors", run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt"}
    return _resolved(init) in {_resolved(c) for c in candidates}


def read_evaluation(evaluation: Path, run: Path) -> dict[str, Any]:
    """The summary of ``EVAL/results.json`` (docs/evaluate.md): protocol, folds, seeds, selection and each init's
    mean ± std, with ``this_encoder`` marking the inits that are this run."""
    path = evaluation / "results.json"
    results = read_json(path, ExportError, "EVAL_DIR must be a `sonocl evaluate --out` directory")
    config = results.get("config", {})
    inits = [
        {
            "label": entry.get("label"),
            "init": entry.get("init"),
            "this_encoder": _is_this_run(str(entry.get("init")), run),
            "pretraining_overlap": (entry.get("pretraining_overlap") or {}).get("note", ""),
            "input": entry.get("input"),
            "summary": entry.get("summary", {}),
        }
        for entry in results.get("inits", [])
    ]
    if not inits:
        raise ExportError(f"{path}: no evaluated inits; was the evaluation interrupted before its first init finished?")
    return {
        "results": str(path.resolve()),
        "schema": results.get("schema"),
        "created": results.get("created"),
        "store": results.get("store"),
        "classes": results.get("classes", []),
        "num_videos": results.get("num_videos"),
        "protocol": config.get("protocol"),
        "folds": config.get("folds"),
        "seeds": config.get("seeds"),
        "group_by": config.get("group_by"),
        "selection": config.get("selection"),
        "optimistic": bool(results.get("optimistic", False)),
        "inits": inits,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_metadata(run: Path, weights: Path, evaluation: Path | None = None) -> dict[str, Any]:
    """Everything ``sonocl_encoder.json`` says, from the run directory, its weights file and the evaluation."""
    from sonocl.backbones import Backbone
    from sonocl.models import encoder_metadata

    config = read_run_config(run)
    header = encoder_metadata(weights)
    provenance, provenance_summary = read_provenance(run)
    arch = str(header.get("arch", "resnet18"))
    spec = Backbone.named(arch)
    channels = int(header.get("channels", 1))
    return {
        "schema": SCHEMA,
        "sonocl_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run.resolve()),
        "weights": {
            "file": weights.name,
            "sha256": _sha256(weights),
            "key_names": "torchvision" if spec.is_resnet else "timm",
            "stem_channels": 3 if spec.is_resnet else channels,
        },
        "arch": arch,
        "feature_dim": spec.feature_dim,
        "channels": channels,
        "input": {
            "size": int(header.get("size", config.get("size", 224))),
            "mean": header.get("mean"),
            "std": header.get("std"),
            "scale": "greyscale pixel / 255, then (x - mean) / std",
        },
        "method": header.get("method", config.get("method")),
        "budget": training_budget(run, config),
        "store": ", ".join(_as_list(config.get("store"))),
        "provenance": provenance,
        "provenance_summary": provenance_summary,
        "evaluation": read_evaluation(evaluation, run) if evaluation is not None else None,
        "pretrain_config": config,
    }


def timm_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` in timm's Hub format, from ``sonocl_encoder.json``'s content: what `timm.create_model`
    needs to rebuild the encoder (``model_args``) and what its data config reads (``pretrained_cfg``)."""
    from sonocl.backbones import Backbone

    spec = Backbone.named(metadata["arch"])
    channels, size = metadata["weights"]["stem_channels"], metadata["input"]["size"]
    model_args: dict[str, Any] = {**spec.timm_args, "in_chans": channels}
    if spec.patch_size is not None:
        model_args["img_size"] = size
        if spec.takes_any_size:
            model_args["dynamic_img_size"] = True
    return {
        "architecture": spec.timm_name or spec.name,  # timm's resnet18/34/50 are torchvision's, names included
        "num_classes": 0,
        "num_features": spec.feature_dim,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [channels, size, size],
            "fixed_input_size": not spec.takes_any_size,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "mean": [metadata["input"]["mean"]] * channels,
            "std": [metadata["input"]["std"]] * channels,
            "num_classes": 0,
        },
    }


# ------------------------------------------------------------------------------------------ export


def export(
    run: Path, out: Path, evaluation: Path | None = None, overwrite: bool = False, onnx: bool = False
) -> dict[str, Any]:
    """Write the bundle of ``run`` into ``out`` (new, empty or a bundle; each file replaced atomically); its
    metadata. ``overwrite`` writes into a folder sonocl did not make (`sonocl.outputs`); ``onnx`` adds
    ``encoder.onnx``."""
    from sonocl.files import atomic_write, atomic_write_text
    from sonocl.models import ENCODER_FILE, WeightsError, load_encoder

    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ExportError(f"{run}: not a directory; RUN must be a `sonocl pretrain --out` directory")
    source = run / ENCODER_FILE
    if not source.is_file():
        raise ExportError(
            f"{source}: not found; a run writes it at its end or on Ctrl-C (`sonocl pretrain --resume` "
            "finishes an interrupted one)"
        )
    if out.resolve() == run.resolve():
        raise ExportError(f"--out {out}: is the run directory itself; choose a new folder")
    try:
        load_encoder(source)  # a file that does not load must not travel
    except WeightsError as error:
        raise ExportError(str(error)) from error
    metadata = bundle_metadata(run, source, evaluation)  # every input read before anything is written
    graph = onnx_graph(source, metadata) if onnx else None
    claim(out, BUNDLE, overwrite=overwrite)
    # byte for byte (save_encoder already wrote the family's names and stem), through the one atomic writer: a full
    # disk is one line naming the file, with the previous bundle's file intact and no temporary left
    atomic_write(out / ENCODER_FILE, lambda handle: _copy_into(source, handle))
    write_json(out / TIMM_CONFIG_FILE, timm_config(metadata))
    write_json(out / BUNDLE_FILE, metadata)
    atomic_write_text(out / CARD_FILE, model_card(metadata))
    (out / "MODEL_CARD.md").unlink(missing_ok=True)  # the card's name in bundles written before README.md
    if graph is not None:
        atomic_write(out / ONNX_FILE, lambda handle: handle.write(graph))
    return metadata


def onnx_graph(weights: Path, metadata: Mapping[str, Any]) -> bytes:
    """The encoder of ``weights`` as ONNX bytes (torch's exporter; any batch size), with the stem of the weights
    file (as ``config.json`` says), refused unless onnxruntime gives PyTorch's features on a random batch to
    `ONNX_TOLERANCE`."""
    import tempfile

    import torch

    from sonocl.models import load_encoder

    try:
        import onnxruntime
    except ImportError:
        raise ExportError("--onnx needs onnx, onnxscript and onnxruntime: pip install 'sonocl[onnx]'") from None
    stem, size = metadata["weights"]["stem_channels"], metadata["input"]["size"]
    encoder = load_encoder(weights, channels=stem).eval()
    images = torch.rand(3, stem, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ONNX_FILE
        torch.onnx.export(encoder, (images,), str(path), input_names=["images"], output_names=["features"],
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), dynamo=True, external_data=False,
                          verbose=False)  # fmt: skip
        graph = path.read_bytes()
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = encoder(images).numpy()
    difference = float(abs(session.run(None, {"images": images.numpy()})[0] - expected).max())
    if difference > ONNX_TOLERANCE:
        raise ExportError(
            f"the ONNX graph of {metadata['arch']} gives features {difference:.2g} away from PyTorch's (more than "
            f"{ONNX_TOLERANCE}); export without --onnx"
        )
    return graph


def _copy_into(source: Path, handle: Any) -> None:
    with open(source, "rb") as original:
        shutil.copyfileobj(original, handle, 1 << 20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="a `sonocl pretrain --out` directory")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write (created)")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--onnx", action="store_true", help="also write encoder.onnx, checked with onnxruntime (extra sonocl[onnx])"
    )
    parser.add_argument(
        "--eval",
        dest="evaluation",
        type=Path,
        metavar="EVAL_DIR",
        help="a `sonocl evaluate --out` directory whose results.json goes into the model card",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    metadata = export(args.run, args.out, args.evaluation, overwrite=args.overwrite, onnx=args.onnx)
    budget = metadata["budget"]
    out = args.out
    print(
        f"sonocl export: {metadata['method']} {metadata['arch']}, {budget['steps']} steps × batch "
        f"{budget['batch_size']} = {budget['pairs_seen']:,} pairs",
        file=sys.stderr,
    )
    for name in ("encoder.safetensors", TIMM_CONFIG_FILE, BUNDLE_FILE, CARD_FILE, *([ONNX_FILE] if args.onnx else [])):
        size = (out / name).stat().st_size
        print(
            f"  {out / name}  ({size / 1e6:.1f} MB)" if size >= 1e5 else f"  {out / name}  ({size / 1e3:.1f} kB)",
            file=sys.stderr,
        )
    print(
        f'load: sonocl.load_encoder("{out}"), timm.create_model("local-dir:{out}", pretrained=True) (see {out / CARD_FILE}); '
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0
