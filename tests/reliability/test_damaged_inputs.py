"""Damaged and misfitting inputs, and writes that fail inside torch's and safetensors' own writers.

Three classes, each a rule over every command it applies to:

- a write of a checkpoint, an encoder file or a bundle that fails (disk full, file too large), also inside
  ``torch.save`` (which reports it as a ``RuntimeError``), ends in one line naming the file (exit 1), leaves the
  previous file and no temporary;
- damaged run files (an undecodable ``metrics.csv``, a bad ``config.yaml``, a ``provenance.json`` of the wrong shape)
  are named in one line by every command that reads them, and a damaged cached fold run is computed again, with a
  note naming it;
- ``--init`` weights that do not fit: a sonocl encoder of another backbone is loaded as the backbone it records
  (an explicit ``--backbone`` that contradicts it is one line), foreign weights of another architecture name their
  first misfitting tensor, and an empty or cut ``.safetensors`` or one with damaged metadata is one line naming it,
  for pretrain, evaluate, embed and segment, and a run's encoder for export and report.

The fold-cache tests run before the ``--init`` ones on purpose: after an in-process ``evaluate`` of the resnet34
encoder, a later ``segment`` in the same process trains several times slower (seen on a 2-core CPU; not a result
of these tests' inputs).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from reliability_support import (
    INIT_COMMANDS,
    FillingFile,
    line_naming,
    random_store,
    run_cli,
    smallest_pretrain,
    with_init,
)
from safetensors.torch import load_file, save_file

import sonocl.files as files_module
from sonocl.cli import main
from sonocl.files import WriteFailedError
from sonocl.models import ENCODER_FILE, build_backbone, save_encoder
from sonocl.train.checkpoint import save_checkpoint

# ---- shared inputs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(store, run)``: the smallest SimCLR run, made once; tests damage copies of it, never the run itself."""
    root = tmp_path_factory.mktemp("trained")
    store = random_store(root / "store", ["a", "b"] * 4)
    assert main([str(arg) for arg in ["pretrain", "--store", store, *smallest_pretrain(root / "run")]]) == 0
    return store, root / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 32×32 images with their masks, for ``sonocl segment``."""
    folder = tmp_path_factory.mktemp("segment") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"scan{index}.png")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8 : 16 + 2 * index, 8:20] = 255
        Image.fromarray(mask).save(folder / f"scan{index}_mask.png")
    return folder


@pytest.fixture(scope="module")
def resnet34_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sonocl ``encoder.safetensors`` of a resnet34 (its metadata says so)."""
    path = tmp_path_factory.mktemp("resnet34") / ENCODER_FILE
    metadata = {"arch": "resnet34", "channels": 1, "size": 32, "mean": 0.5, "std": 0.25, "method": "simclr"}
    save_encoder(build_backbone("resnet34", 1), path, metadata)
    return path


@pytest.fixture(scope="module")
def resnet50_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's resnet50 state dict, as a user downloads it: foreign weights that do not fit a resnet18."""
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def damaged_encoders(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``.safetensors`` files of three kinds of damage: empty, cut in half, and metadata that is not JSON."""
    _, run = trained
    folder = tmp_path_factory.mktemp("damaged")
    good = (run / ENCODER_FILE).read_bytes()
    empty, cut, metadata = folder / "empty.safetensors", folder / "cut.safetensors", folder / "metadata.safetensors"
    empty.write_bytes(b"")
    cut.write_bytes(good[: len(good) // 2])
    save_file(load_file(str(run / ENCODER_FILE)), str(metadata), metadata={"arch": '"resnet18"', "channels": "{1"})
    return {"empty": empty, "cut": cut, "metadata": metadata}


def _init_args(command: str, store: Path, images: Path, init: Path, out: Path) -> list[str | Path]:
    """``sonocl COMMAND --init INIT`` of a smallest run: `with_init`, and ``segment`` on ``images``."""
    if command != "segment":
        return with_init(command, store, init, out)
    return ["segment", "--images", images, "--init", init, "--folds", "2", "--size", "32", "--epochs", "1",
            "--out", out / "seg", "--device", "cpu"]  # fmt: skip


def _copy_with(run: Path, tmp_path: Path, name: str, content: bytes, store_moved: bool = False) -> Path:
    """A copy of ``run`` (hard links: the checkpoints are not copied) whose file ``name`` holds ``content``; with
    ``store_moved`` its configuration names a store that is not there (a report then skips the frames' sections)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, copy_function=os.link, ignore=shutil.ignore_patterns(".lock"))
    if store_moved:
        config = (copy / "config.yaml").read_text()
        (copy / "config.yaml").unlink()
        (copy / "config.yaml").write_text(re.sub(r"(?m)^store: .*$", f"store: {tmp_path / 'moved'}", config))
    (copy / name).unlink()
    (copy / name).write_bytes(content)
    return copy


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temporaries(folder: Path) -> list[str]:
    return [path.name for path in folder.rglob("*.tmp*")]


@contextlib.contextmanager
def _files_limited_to(size: int) -> Iterator[None]:
    """Every file this process writes stops at ``size`` bytes (``RLIMIT_FSIZE``): a write past it fails in the kernel
    (``EFBIG``, File too large) inside torch's, safetensors' and shutil's own writers too, as a full disk does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# ---- 1. writes failing inside torch's and safetensors' writers --------------------------------------------------


def test_checkpoint_write_failing_inside_torch_save_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills while ``torch.save`` writes ``last.pt``: torch raises a RuntimeError around the OSError."""
    store = random_store(tmp_path / "store", ["a", "b"] * 4)
    real_open = builtins.open
    filled = []

    def open_filling(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith(".last.pt."):
            filled.append(file)
            return FillingFile(handle, room=4096)
        return handle

    monkeypatch.setattr(files_module, "open", open_filling, raising=False)
    run = tmp_path / "run"
    result = run_cli(capsys, "pretrain", "--store", store, *smallest_pretrain(run), "--steps", "2")
    assert filled and result.code == 1
    line = line_naming(result.err, run / "checkpoints" / "last.pt")
    assert "writing failed (No space left on device)" in line, line
    assert not _temporaries(run)


def test_torch_writer_failure_without_an_os_error_is_a_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.save`` writing to a path reports a full disk only as ``PytorchStreamWriter failed writing file``."""
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    before = _digest(path)
    real_save = torch.save

    def failing_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        )

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(WriteFailedError, match=f"^{re.escape(str(path))}: writing failed .*PytorchStreamWriter"):
        save_checkpoint({"step": torch.tensor(2), "more": torch.zeros(1000)}, path)
    assert _digest(path) == before and not _temporaries(tmp_path)


def test_encoder_write_failing_inside_safetensors_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / ENCODER_FILE
    backbone = build_backbone("resnet18", 1)
    save_encoder(backbone, path, {"arch": "resnet18", "channels": 1})
    before = _digest(path)
    with _files_limited_to(1 << 20), pytest.raises(WriteFailedError, match=f"^{re.escape(str(path))}: writing failed"):
        save_encoder(backbone, path, {"arch": "resnet18", "channels": 1})
    assert _digest(path) == before and not _temporaries(tmp_path)


def test_export_write_failing_keeps_the_previous_bundle_and_no_temporary(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    bundle = tmp_path / "bundle"
    assert run_cli(capsys, "export", run, "--out", bundle).code == 0
    before = _digest(bundle / ENCODER_FILE)
    with _files_limited_to(1 << 20):
        result = run_cli(capsys, "export", run, "--out", bundle)
    assert result.code == 1
    assert "writing failed (File too large)" in line_naming(result.err, bundle / ENCODER_FILE)
    assert _digest(bundle / ENCODER_FILE) == before
    assert not _temporaries(bundle)


# ---- 2. damaged run files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "report"])
def test_undecodable_metrics_csv_is_named(
    command: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    damaged = (run / "metrics.csv").read_bytes()[:80] + b"\xff\xfe\x00\x9c\n"
    copy = _copy_with(run, tmp_path, "metrics.csv", damaged, store_moved=True)
    result = run_cli(capsys, command, copy, "--out", tmp_path / ("bundle" if command == "export" else "report.html"))
    assert "not UTF-8" in line_naming(result.err, copy / "metrics.csv")
    assert result.code == (2 if command == "export" else 0)


CONFIG_DAMAGE = {
    "yaml": lambda text: text.replace("epochs: 1", "epochs: [1"),
    "bytes": lambda text: text.replace("epochs: 1", "epochs: \udcff"),
    "type": lambda text: text.replace("epochs: 1", "epochs: many"),
}


@pytest.mark.parametrize("command", ["resume", "export", "report"])
@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_bad_run_config_is_named(
    damage: str, command: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    text = CONFIG_DAMAGE[damage]((run / "config.yaml").read_text())
    assert text != (run / "config.yaml").read_text()
    copy = _copy_with(run, tmp_path, "config.yaml", text.encode("utf-8", "surrogateescape"))
    args: dict[str, list[str | Path]] = {
        "resume": ["pretrain", "--out", copy, "--resume", "--no-progress", "--device", "cpu"],
        "export": ["export", copy, "--out", tmp_path / "bundle"],
        "report": ["report", copy, "--out", tmp_path / "report.html"],
    }
    result = run_cli(capsys, *args[command])
    line_naming(result.err, copy / "config.yaml")
    assert result.code == (0 if command == "report" else 2)
    assert len(result.err.strip().splitlines()) == (2 if command == "report" else 1), result.err  # report: + "wrote"


@pytest.mark.parametrize("command", ["evaluate", "export"])
@pytest.mark.parametrize("shape", ["list", "string"])
def test_provenance_of_the_wrong_shape_is_named(
    shape: str, command: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list, or ``trained_on`` a string: as a set of characters it would pass the leak guard unnoticed."""
    store, run = trained
    provenance = json.loads((run / "provenance.json").read_text())
    damaged = [provenance] if shape == "list" else {**provenance, "labels_used": "".join(provenance["trained_on"])}
    copy = _copy_with(run, tmp_path, "provenance.json", json.dumps(damaged).encode())
    evaluate = ["evaluate", "--store", store, "--init", copy, "--protocol", "knn", "--folds", "2", "--out",
                tmp_path / "eval", "--device", "cpu"]  # fmt: skip
    result = run_cli(capsys, *(evaluate if command == "evaluate" else ["export", copy, "--out", tmp_path / "bundle"]))
    assert result.code == 2
    line = line_naming(result.err, copy / "provenance.json")
    assert ("labels_used" in line) if shape == "string" else ("JSON object" in line), line


FOLD_DAMAGE = {"truncated": lambda data: data[: len(data) // 2], "garbage": lambda data: b"\x00garbage" * 10}


@pytest.mark.parametrize("damage", list(FOLD_DAMAGE))
def test_damaged_cached_evaluation_fold_is_computed_again(
    damage: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _ = trained
    out = tmp_path / "eval"
    args = ["evaluate", "--store", store, "--init", "random", "--protocol", "knn", "--folds", "2", "--out", out,
            "--device", "cpu"]  # fmt: skip
    assert run_cli(capsys, *args).code == 0
    first = json.loads((out / "results.json").read_text())["inits"][0]["summary"]
    [cached] = (out / "folds").glob("*/seed0_fold0.npz")
    cached.write_bytes(FOLD_DAMAGE[damage](cached.read_bytes()))
    result = run_cli(capsys, *args)
    assert result.code == 0
    assert "computing it again" in line_naming(result.err, cached)
    assert json.loads((out / "results.json").read_text())["inits"][0]["summary"] == first
    with np.load(cached) as rewritten:  # whole again
        assert set(rewritten.files) >= {"key", "run", "test_frames", "probabilities"}


def test_damaged_cached_segmentation_fold_is_computed_again(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _init_args("segment", tmp_path, images, Path("random"), tmp_path)
    assert run_cli(capsys, *args).code == 0
    cached = tmp_path / "seg" / "folds" / "init0_fold0.json"
    cached.write_bytes(cached.read_bytes()[:50] + b"\xff")
    result = run_cli(capsys, *args)
    assert result.code == 0
    assert "computing it again" in line_naming(result.err, cached)
    json.loads(cached.read_text())  # rewritten whole


# ---- 3. --init weights that do not fit --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [*INIT_COMMANDS, "segment"])
def test_an_encoder_of_another_backbone_is_loaded_as_the_backbone_it_records(
    command: str,
    trained: tuple[Path, Path],
    images: Path,
    resnet34_encoder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not trained to the end where that is slow: pretrain prints its resolved configuration, segment is given an
    image without a mask, which it refuses after loading its inits (and before training)."""
    store, _ = trained
    if command == "segment":
        images = tmp_path / "unmasked"
        images.mkdir()
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(images / "scan.png")
    args = _init_args(command, store, images, resnet34_encoder, tmp_path)
    if command == "pretrain":
        args.append("--print-config")
    result = run_cli(capsys, *args)
    assert result.code == (2 if command == "segment" else 0), result.err
    if command == "pretrain":
        assert "backbone: resnet34" in result.out
        assert "so the run is a resnet34" in line_naming(result.err, resnet34_encoder)
    else:
        assert "sonocl, resnet34" in line_naming(result.err, f"init {str(resnet34_encoder)!r}")
    if command == "segment":
        assert "no mask found" in result.err


@pytest.mark.parametrize("command", [*INIT_COMMANDS, "segment"])
def test_a_backbone_option_that_contradicts_the_encoder_is_one_line(
    command: str,
    trained: tuple[Path, Path],
    images: Path,
    resnet34_encoder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, _ = trained
    result = run_cli(capsys, *_init_args(command, store, images, resnet34_encoder, tmp_path), "--backbone", "resnet18")
    assert result.code == 2
    line = line_naming(result.err, resnet34_encoder)
    assert "resnet34" in line and "--backbone resnet18" in line, line


@pytest.mark.parametrize("command", ["evaluate", "embed", "segment"])
def test_foreign_weights_of_another_architecture_name_the_first_misfit(
    command: str,
    trained: tuple[Path, Path],
    images: Path,
    resnet50_state: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, _ = trained
    result = run_cli(capsys, *_init_args(command, store, images, resnet50_state, tmp_path))
    assert result.code == 2
    line = line_naming(result.err, resnet50_state)
    assert "layer1.0.conv1.weight" in line and "(64, 64, 1, 1)" in line and "(64, 64, 3, 3)" in line, line
    assert "--backbone resnet50" in line, line


@pytest.mark.parametrize("kind", ["empty", "cut", "metadata"])
@pytest.mark.parametrize("command", [*INIT_COMMANDS, "segment"])
def test_damaged_safetensors_init_is_one_line(
    command: str,
    kind: str,
    trained: tuple[Path, Path],
    images: Path,
    damaged_encoders: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, _ = trained
    path = damaged_encoders[kind]
    result = run_cli(capsys, *_init_args(command, store, images, path, tmp_path))
    assert result.code == 2
    reason = {"empty": "empty file (0 bytes)", "cut": "cut short", "metadata": "metadata"}[kind]
    assert reason in line_naming(result.err, path)


@pytest.mark.parametrize("command", ["export", "report"])
def test_damaged_run_encoder_is_named_by_export_and_report(
    command: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    good = (run / ENCODER_FILE).read_bytes()
    copy = _copy_with(run, tmp_path, ENCODER_FILE, good[: len(good) // 3])
    result = run_cli(capsys, command, copy, "--out", tmp_path / ("bundle" if command == "export" else "report.html"))
    assert "cut short" in line_naming(result.err, copy / ENCODER_FILE)
    if command == "export":
        assert result.code == 2 and not (tmp_path / "bundle").exists()
    else:  # the report is written without the parts that need the encoder, and says so
        assert result.code == 0 and (tmp_path / "report.html").is_file()
