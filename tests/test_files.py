"""`sonocl.files`: the one JSON writer and reader (atomic writes themselves: tests/reliability/test_write_failures.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sonocl.errors import UserError
from sonocl.files import json_text, read_json, write_json


class _Refused(UserError):
    pass


def test_numpy_numbers_are_plain_and_non_finite_floats_are_null(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    data = {"n": np.int64(3), "x": np.float32(0.5), "v": np.arange(3), "bad": [math.nan, np.float64(math.inf)]}
    write_json(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == {"n": 3, "x": 0.5, "v": [0, 1, 2], "bad": [None, None]}
    assert path.read_text(encoding="utf-8").endswith("}\n") and "NaN" not in path.read_text(encoding="utf-8")


def test_a_cache_keeps_non_finite_floats_exactly() -> None:
    text = json_text({"dice": [np.float64(math.nan), 0.1 + 0.2, -math.inf]}, nan=True)
    back = json.loads(text)["dice"]
    assert math.isnan(back[0]) and back[1] == 0.1 + 0.2 and back[2] == -math.inf


def test_read_json_names_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    hint = "give a `sonocl evaluate --out` directory"
    with pytest.raises(_Refused, match=rf"^{tmp_path / 'a.json'}: not found; {hint}$"):
        read_json(tmp_path / "a.json", _Refused, hint)
    (tmp_path / "b.json").write_text('{"cut": ', encoding="utf-8")
    with pytest.raises(_Refused, match=r"b\.json: not valid JSON \(Expecting value"):
        read_json(tmp_path / "b.json", _Refused)
    (tmp_path / "c.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.json: expected a JSON object, found list$"):
        read_json(tmp_path / "c.json")
    (tmp_path / "d.json").write_bytes(b'{"x": "\xff"}')
    with pytest.raises(UserError, match=r"d\.json: cannot be read"):
        read_json(tmp_path / "d.json")
    write_json(tmp_path / "e.json", {"ok": True})
    assert read_json(tmp_path / "e.json") == {"ok": True}
