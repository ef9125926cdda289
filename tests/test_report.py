"""`sonocl report`: a real tiny Meta-USCL run and a real kNN evaluation on the phantom, a segmentation output in
`sonocl segment`'s format; the page is self-contained, has every section, and loads in headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sonocl.cli import main
from sonocl.report.page import png_size

TINY_PRETRAIN = [
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--size",
    "64",
    "--precision",
    "fp32",
    "--workers",
    "0",
    "--no-progress",
    "--set",
    "options.items=videos",
    "--meta-batch-size",
    "4",
    "--set",
    "model.projection_hidden=64",
    "--set",
    "knn_frames_per_video=4",
]
SECTIONS = (
    "Training curves",
    "Positive pairs as the sampler and the augmentation make them",
    "Meta-USCL: CMW-Net pair weights",
    "Embedding map",
    "Grad-CAM: what the encoder looks at",
    "Comparison table",
    "Confusion matrices",
    "Per-fold scores",
    "ROC curves",
    "Segmentation overlays",
)


@pytest.fixture(scope="module")
def run_dir(phantom_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "meta_run"
    assert (
        main(
            ["pretrain", "--store", str(phantom_store.root), "--method", "meta-uscl", "--out", str(out), *TINY_PRETRAIN]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def eval_dir(phantom_store, run_dir) -> Path:
    out = run_dir.parent / "eval"
    assert (
        main(
            [
                "evaluate",
                "--store",
                str(phantom_store.root),
                "--init",
                "random",
                str(run_dir),
                "--name",
                "random",
                "meta-uscl",
                "--protocol",
                "knn",
                "--size",
                "32",
                "--folds",
                "3",
                "--fps",
                "5",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def segment_dir(run_dir) -> Path:
    """A `sonocl segment` output (schema sonocl.segment/1) with two overlays, written in its format."""
    from sonocl.evaluate.segment import SCHEMA
    from sonocl.evaluate.segment_folds import write_overlay

    out = run_dir.parent / "segment"
    image = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    truth = np.zeros((30, 40), dtype=bool)
    truth[8:20, 10:30] = True
    for name in ("case_01", "case_02"):
        write_overlay(out / "overlays" / "random" / f"{name}.png", image, truth[None], np.roll(truth, 2, axis=1)[None])
    stats = {"mean": 0.8, "std": 0.05, "median": 0.8, "n": 2}
    fold = {"fold": 0, "num_train": 2, "num_test": 2, "metrics": {"dice": stats, "iou": stats, "hd95_px": stats}}
    results = {
        "schema": SCHEMA,
        "config": {"folds": 2, "size": 32, "epochs": 2},
        "data": {"num_images": 4, "num_groups": 4, "hd95_unit": "px", "hc_available": False, "skipped": []},
        "inits": [
            {
                "name": "random",
                "folds": [fold, {**fold, "fold": 1}],
                "summary": {"dice": stats, "iou": stats, "hd95_px": stats},
            }
        ],
    }
    (out / "results.json").write_text(json.dumps(results))
    return out


@pytest.fixture(scope="module")
def report(run_dir, eval_dir, segment_dir) -> Path:
    out = run_dir.parent / "report.html"
    assert (
        main(["report", str(run_dir), str(eval_dir), str(segment_dir), "--out", str(out), "--max-points", "120"]) == 0
    )
    return out


def test_report_is_self_contained_and_has_every_section(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f">{html.escape(title)}</h" in page, title
    assert "Skipped" not in page, "the store is reachable: nothing may be skipped"
    assert "linear head (logistic regression) fitted here on frozen features" in page
    assert "Computed here, not logged" in page  # CMW weights from the checkpoint, said so
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, re.IGNORECASE)
    assert not re.search(r"https?://", page), "no external requests (and no links that would make one)"
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert references and all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in references)
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" width="(\d+)" height="(\d+)"', page)
    assert len(images) == page.count("<img") >= 10
    for data, width, height in images:
        assert png_size(base64.b64decode(data)) == (int(width), int(height))
    anchors = set(re.findall(r'<section id="([^"]+)"', page))
    assert set(re.findall(r'href="#([^"]+)"', page)) == anchors


def test_report_without_the_store_skips_what_needs_it(run_dir: Path, tmp_path: Path) -> None:
    import yaml

    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "metrics.csv", copy / "metrics.csv")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["store"] = str(tmp_path / "moved_store")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "r.html"
    assert main(["report", str(copy), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert ">Training curves</h" in page and page.count("<img") >= 2  # curves + CMW summary from metrics.csv
    assert page.count("Skipped: the frame store") == 3 and "Per-pair weights skipped" in page


def test_report_rejects_an_unknown_path(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a sonocl pretraining run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ browser

_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || ("failed to load " + ((e.target && e.target.tagName) || e.type))));
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify({images: images.length, loaded: loaded, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary (apt-get install -y chromium)")


def _browse(binary: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments], capture_output=True, text=True, timeout=180
    )


def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Every image decodes and no script error occurs (a probe script added to a copy of the page reports both into
    the DOM, which --dump-dom prints); then a screenshot of the page itself."""
    binary = _chromium()
    page = report.read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>\n" + _PROBE, 1), encoding="utf-8")
    dumped = _browse(binary, tmp_path / "profile1", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', dumped.stdout, re.DOTALL)
    assert match, f"no probe result in the DOM (exit {dumped.returncode}): {dumped.stderr[-2000:]}"
    result = json.loads(html.unescape(match.group(1)))
    assert result["images"] == page.count("<img") and result["images"] > 0
    assert result["loaded"] == result["images"], result
    assert result["errors"] == []

    screenshot = tmp_path / "report_screenshot.png"
    shot = _browse(
        binary, tmp_path / "profile2", f"--screenshot={screenshot}", "--window-size=1280,4000", report.as_uri()
    )
    assert screenshot.is_file(), shot.stderr[-2000:]
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1280, 4000)
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
