"""docs/api.md: every ```python block runs, in order, in one namespace and a fresh folder, as a notebook would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

API_DOC = REPO_ROOT / "docs" / "api.md"


def python_blocks(markdown: str) -> list[str]:
    """The code of every fenced ```python block, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_every_python_example_of_the_api_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(API_DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared test machine; the examples themselves leave torch's default
    namespace: dict = {"__name__": "api_doc"}
    try:
        for number, code in enumerate(blocks, start=1):
            exec(compile(code, f"{API_DOC}, python block {number}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
