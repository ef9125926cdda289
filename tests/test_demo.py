"""`sonocl demo` end to end, shrunk: phantom files → ingest → pretrain → evaluate → report."""

from __future__ import annotations

import json

from sonocl.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--videos", "12", "--frames", "12", "--epochs", "1", "--eval-epochs", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Report: " in printed and "random" in printed and "uscl" in printed

    info = json.loads((out / "store" / "ingest_report.json").read_text())
    assert info["counts"]["added"] == 12 and info["counts"]["skipped"] == 0  # mp4 and DICOM cine both ingested
    assert (out / "pretrain-uscl" / "encoder.safetensors").is_file()
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert [entry["label"] for entry in results["inits"]] == ["random", "uscl"]
    assert all(len(entry["runs"]) == 5 for entry in results["inits"])
    html = (out / "report.html").read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html
