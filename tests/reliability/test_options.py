"""Options and option files that cannot work, refused before any work in one line naming the option or file; and
names that are not UTF-8 (or a log that is not a terminal) handled as a user would expect.

Kinds: YAML alias bombs in every YAML a command reads (`--config`, `--set`, a run's `config.yaml`); numeric options
out of range, not finite, or more folds than groups, for every command that takes them; file names and output
folders holding bytes that are not UTF-8; `sonocl segment`'s progress written to a log. docs/reliability.md counts
them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_support import Outcome, good_video, random_store, run_cli, smallest_pretrain

from sonocl.models import build_backbone, save_encoder

BOMB_LEVELS = 9
"""Nine lists of nine aliases of the level below: 9⁹ ≈ 387 million strings once expanded (the tester's 6 GB)."""


def alias_bomb(levels: int = BOMB_LEVELS, flow: bool = False) -> str:
    """The YAML "billion laughs": a few hundred bytes whose nested aliases expand to ``9**levels`` strings."""
    names = "abcdefghijklmnop"[:levels]
    entries = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    entries += [f"{name}: &{name} [{', '.join(['*' + below] * 9)}]" for below, name in zip(names, names[1:])]
    if flow:
        return "{" + ", ".join(entries) + "}"
    return "steps:\n" + "".join(f"  {entry}\n" for entry in entries)


def refusal(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Outcome:
    """``sonocl ARGS`` expected to refuse: exit 2, no traceback. argparse's own refusals (a ``type=`` check) end in
    ``SystemExit(2)`` after its usage line and ``sonocl X: error: argument --OPTION: …``; both are accepted."""
    try:
        result = run_cli(capsys, *args)
    except SystemExit as stop:
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        result = Outcome(int(stop.code or 0), out, err)
    assert result.code == 2, result.err
    return result


def one_line(err: str, *words: str) -> str:
    """The one ``sonocl …`` line of ``err`` holding every word (the option or file and what is wrong)."""
    lines = [line for line in err.splitlines() if line.startswith("sonocl ") and all(word in line for word in words)]
    assert len(lines) == 1, f"{len(lines)} lines hold {words}:\n{err}"
    return lines[0]


@pytest.fixture()
def small_store(tmp_path: Path) -> Path:
    return random_store(tmp_path / "store", ["a", "b", "a", "b"])


# ---- YAML alias bombs ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["config", "set", "export"])
def test_yaml_alias_bomb_is_refused_before_it_expands(
    where: str, small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 9⁹ alias bomb under ``steps:`` took 6 GB and 44 s, then a traceback; now refused on reading, file named."""
    pretrain = ["pretrain", "--store", small_store, "--method", "simclr", "--out", tmp_path / "run"]
    if where == "config":
        path = tmp_path / "bomb.yaml"
        path.write_text(alias_bomb())
        assert len(path.read_bytes()) < 600
        result = refusal(capsys, *pretrain, "--config", path)
        line = one_line(result.err, str(path), "alias")
    elif where == "set":
        result = refusal(capsys, *pretrain, "--set", "steps=" + alias_bomb(flow=True))
        line = one_line(result.err, "--set", "alias")
    else:  # a run directory handed over for export: its config.yaml is read
        run = tmp_path / "shared-run"
        run.mkdir()
        save_encoder(build_backbone("resnet18", 1), run / "encoder.safetensors", {"arch": "resnet18", "channels": 1})
        (run / "config.yaml").write_text("method: simclr\n" + alias_bomb())
        result = refusal(capsys, "export", run, "--out", tmp_path / "bundle")
        line = one_line(result.err, str(run / "config.yaml"), "alias")
        assert not (tmp_path / "bundle").exists()
    assert len(line) < 400, line
    assert not (tmp_path / "run").exists()


# ---- numeric options -----------------------------------------------------------------------------------------------


def _images_with_masks(folder: Path, count: int, size: int = 32) -> Path:
    """``scanN.png`` and ``scanN_mask.png``: noise and a square, each image its own group."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"scan{index}.png")
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[8 + index % 4 : 20 + index % 4, 6:22] = 255
        Image.fromarray(mask).save(folder / f"scan{index}_mask.png")
    return folder


def _command(name: str, store: Path, tmp_path: Path) -> list[str | Path]:
    """The smallest valid ``sonocl NAME`` on ``store`` (writing under ``tmp_path/out``); options added after it win."""
    out = tmp_path / "out"
    evaluation = ["--protocol", "knn", "--folds", "2", "--device", "cpu"]
    tiny = ["--size", "32", "--epochs", "1", "--batch-size", "2", "--device", "cpu"]
    if name == "ingest":
        return ["ingest", good_video(tmp_path / "scan.mp4"), "--out", out, "--workers", "1"]
    if name == "pretrain":
        return ["pretrain", "--store", store, *smallest_pretrain(out)]
    if name == "evaluate":
        return ["evaluate", "--store", store, "--init", "random", "--out", out, *evaluation]
    if name == "study":
        return ["study", "--store", store, "--pretrain", "--method simclr --epochs 1 --size 32", "--out", out,
                *evaluation]  # fmt: skip
    if name == "segment":
        images = _images_with_masks(tmp_path / "images", 4)
        return ["segment", "--images", images, "--init", "random", "--folds", "2", "--out", out, *tiny]
    if name == "embed":
        return ["embed", "--store", store, "--init", "random", "--out", tmp_path / "out.npz", "--device", "cpu",
                "--no-progress"]  # fmt: skip
    assert name == "report"
    return ["report", store, "--out", tmp_path / "out.html"]


BAD_NUMBERS: list[tuple[str, list[str], str]] = [
    # (command, options, the option the one line names)
    ("ingest", ["--size", "7"], "--size"),
    ("pretrain", ["--batch-size", "1"], "--batch-size"),
    ("pretrain", ["--lr", "nan"], "--lr"),
    ("pretrain", ["--lr", "inf"], "--lr"),
    ("pretrain", ["--size", "7"], "--size"),
    ("pretrain", ["--clip-grad", "nan"], "--clip-grad"),
    ("pretrain", ["--temperature", "nan"], "--temperature"),
    ("pretrain", ["--threads", "0"], "--threads"),
    ("pretrain", ["--workers", "-1"], "--workers"),
    ("pretrain", ["--seed", "-1"], "--seed"),
    ("pretrain", ["--set", "optim.weight_decay=inf"], "weight_decay"),
    ("pretrain", ["--set", "checkpoint_every_seconds=.nan"], "checkpoint_every_seconds"),
    ("evaluate", ["--lr", "-1"], "--lr"),
    ("evaluate", ["--lr", "nan"], "--lr"),
    ("evaluate", ["--weight-decay", "inf"], "--weight-decay"),
    ("evaluate", ["--mean", "nan"], "--mean"),
    ("evaluate", ["--std", "0"], "--std"),
    ("evaluate", ["--fps", "nan"], "--fps"),
    ("evaluate", ["--batch-size", "1"], "--batch-size"),
    ("evaluate", ["--size", "7"], "--size"),
    ("evaluate", ["--epochs", "0"], "--epochs"),
    ("evaluate", ["--knn-k", "0"], "--knn-k"),
    ("evaluate", ["--frames-per-video", "-1"], "--frames-per-video"),
    ("evaluate", ["--inner-val-fraction", "nan"], "--inner-val-fraction"),
    ("evaluate", ["--seed", "-1"], "--seed"),
    ("study", ["--lr", "-1"], "--lr"),
    ("segment", ["--lr", "nan"], "--lr"),
    ("segment", ["--weight-decay", "nan"], "--weight-decay"),
    ("segment", ["--mean", "inf"], "--mean"),
    ("segment", ["--std", "nan"], "--std"),
    ("segment", ["--seed", "-1"], "--seed"),
    ("embed", ["--size", "7"], "--size"),
    ("embed", ["--batch-size", "0"], "--batch-size"),
    ("embed", ["--every", "0"], "--every"),
    ("embed", ["--max-frames-per-video", "-1"], "--max-frames-per-video"),
    ("embed", ["--fps", "nan"], "--fps"),
    ("embed", ["--mean", "nan"], "--mean"),
    ("embed", ["--std", "0"], "--std"),
    ("report", ["--max-points", "-5"], "--max-points"),
    ("report", ["--max-points", "0"], "--max-points"),
    ("report", ["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize(
    ("command", "options", "named"), BAD_NUMBERS, ids=[f"{c}{''.join(o)}" for c, o, _ in BAD_NUMBERS]
)
def test_numeric_option_that_cannot_work_is_refused_before_any_work(
    command: str,
    options: list[str],
    named: str,
    small_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every count, size, rate and fraction: in range and finite, or one line naming the option; nothing written."""
    result = refusal(capsys, *_command(command, small_store, tmp_path), *options)
    line = one_line(result.err, named)
    assert line.startswith(f"sonocl {command}: "), line
    for output in ("out", "out.npz", "out.html"):
        assert not (tmp_path / output).exists(), f"{output} was written"


def test_contrastive_batch_of_one_says_why(
    small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = refusal(capsys, *_command("pretrain", small_store, tmp_path), "--batch-size", "1")
    assert "≥ 2" in one_line(result.err, "--batch-size") and "contrastive" in result.err


@pytest.mark.parametrize("command", ["evaluate", "study", "segment"])
def test_more_folds_than_groups_names_the_count_and_the_largest_that_works(
    command: str, small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 videos (or images), each its own group: --folds 5 cannot split them; --folds 4 is the most that works."""
    result = refusal(capsys, *_command(command, small_store, tmp_path), "--folds", "5")
    named = tmp_path / "images" if command == "segment" else small_store
    line = one_line(result.err, "--folds 5", str(named))
    assert " 4 " in line and "--folds 4" in line, line


# ---- names that are not UTF-8 -----------------------------------------------------------------------------------


def test_video_and_output_names_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file name holding byte 0xff (a Latin-1 name on a UTF-8 system) goes in, is evaluated, and every output of
    `evaluate` is written into a folder whose name holds byte 0xfe; the id reads back from the JSON as it was."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for seed, name in enumerate(["cov_a", "cov_b", "reg_a", "reg_b"]):
        good_video(videos / f"{name}.mp4", seed=seed)
    odd = os.fsdecode(b"cov_scan\xff")
    (videos / "cov_b.mp4").rename(videos / f"{odd}.mp4")
    store = tmp_path / "store"
    ingested = run_cli(capsys, "ingest", videos, "--out", store, "--size", "32", "--workers", "1",
                       "--label-from-name", "cov=covid,reg=regular")  # fmt: skip
    assert ingested.code == 0, ingested.err
    out = tmp_path / os.fsdecode(b"eval\xfe")
    result = run_cli(capsys, "evaluate", "--store", store, "--init", "random", "--protocol", "knn", "--folds", "2",
                     "--out", out, "--device", "cpu")  # fmt: skip
    assert result.code == 0, result.err
    for name in ("results.json", "results.md", "predictions.csv"):
        assert (out / name).is_file(), f"{name} is missing"
    predictions = (out / "predictions.csv").read_text(encoding="utf-8")  # still UTF-8: spreadsheets and report read it
    assert "cov_scan\\udcff" in predictions
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["num_videos"] == 4


# ---- progress in a log -----------------------------------------------------------------------------------------------


def test_segment_writes_whole_lines_to_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal (a log file, CI): progress as whole lines, as every other command writes it, not tqdm frames."""
    torch.manual_seed(0)
    result = run_cli(capsys, *_command("segment", tmp_path / "unused", tmp_path))
    assert result.code == 0, result.err
    assert "\r" not in result.err and "\r" not in result.out
