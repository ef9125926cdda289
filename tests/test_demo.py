"""`sonocl demo` end to end, shrunk: phantom files → ingest → pretrain → kNN and last-block evaluation → report."""

from __future__ import annotations

import json

from sonocl.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--videos", "12", "--frames", "12", "--steps", "2", "--eval-epochs", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "Report: " in printed and "kNN on frozen features (headline)" in printed and "last-block fine-tuning" in printed
    )
    assert "What the numbers are:" in printed and "On your own data" in printed

    info = json.loads((out / "store" / "ingest_report.json").read_text())
    assert info["counts"]["added"] == 12 and info["counts"]["skipped"] == 0  # mp4 and DICOM cine both ingested
    assert (out / "pretrain-simclr" / "encoder.safetensors").is_file()
    for protocol in ("knn", "last-block"):
        results = json.loads((out / f"evaluation-{protocol}" / "results.json").read_text())
        assert results["config"]["protocol"] == protocol
        assert [entry["label"] for entry in results["inits"]] == ["random", "simclr"]
        assert all(len(entry["runs"]) == 5 for entry in results["inits"])
    html = (out / "report.html").read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html
