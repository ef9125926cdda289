"""Untrusted checkpoints: a pickle that runs code when loaded is refused by every loader of sonocl.

The payload touches a marker file when unpickled; the test first proves that it does so under a plain
``torch.load(weights_only=False)``, then that no sonocl loader (Python API or command) lets it run,
and that the refusal is one line saying how to load a file one trusts, explicitly.
"""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch
from reliability_support import INIT_COMMANDS, line_naming, random_store, run_cli, with_init

from sonocl.errors import UserError
from sonocl.models import load_encoder
from sonocl.train.checkpoint import load_checkpoint


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: any function could be called the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture()
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a sonocl-shaped checkpoint carrying the payload, and the file the payload creates."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(64, 1, 7, 7)}, "step": _Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload must run when the file is loaded unsafely, or this test proves nothing"
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("loader", [load_encoder, load_checkpoint], ids=["load_encoder", "load_checkpoint"])
def test_python_loaders_refuse_the_payload(loader: object, malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(Exception):  # noqa: B017 - which type is asserted below, per loader
        loader(path)  # type: ignore[operator]
    assert not marker.exists()


@pytest.mark.parametrize("command", INIT_COMMANDS)
def test_commands_refuse_the_payload_and_name_the_file(
    command: str, malicious: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = malicious
    store = random_store(tmp_path / "store", ["a", "b"] * 2)
    result = run_cli(capsys, *with_init(command, store, path, tmp_path))
    assert result.code == 2
    assert not marker.exists()
    line_naming(result.err, path)


def test_refusal_says_in_one_line_how_to_load_a_trusted_file(malicious: tuple[Path, Path]) -> None:
    path, _ = malicious
    with pytest.raises(UserError) as caught:
        load_encoder(path)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert str(path) in message and "trust" in message and "weights_only=False" in message


def test_resume_from_a_malicious_checkpoint_is_one_line(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(UserError, match=str(path)):
        load_checkpoint(path)
    assert not marker.exists()
