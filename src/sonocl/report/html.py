"""`sonocl report PATH... [--out report.html]`: one self-contained HTML page of runs and evaluations.

Each PATH is a pretraining run (``metrics.csv``, ``config.yaml``, ``checkpoints/``, ``encoder.safetensors``), a
`sonocl evaluate` output (``results.json`` with schema ``sonocl.evaluate/1``, ``predictions.csv``) or a
`sonocl segment` output (``results.json`` with schema ``sonocl.segment/1``, ``overlays/``). The page holds
what applies (docs/report.md):

- run: settings, training curves, a pair gallery re-created from the run's configuration and store, CMW-Net
  weights (Meta-USCL), an embedding map, Grad-CAM overlays;
- evaluation: the comparison table, confusion matrices, per-fold scores, accuracy by epoch, ROC curves;
- segmentation: the table, per-fold Dice, overlays.

Images are PNGs embedded as ``data:`` URIs; the page has no script and loads nothing from anywhere. A part that
needs the frame store (pair gallery, embedding map, Grad-CAM, CMW weights) is replaced by a note saying why
when the store cannot be opened.

This module is the command (`build_report`, `is_report`, `add_arguments`, `run`); `sonocl.report.inputs` reads the
PATHs, `sonocl.report.run_sections` and `sonocl.report.score_sections` build each one's part of the page and
`sonocl.report.page` writes its HTML.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sonocl._version import __version__
from sonocl.options import integer
from sonocl.outputs import add_overwrite_argument, claim_file
from sonocl.report.analysis import MAX_MAP_POINTS
from sonocl.report.inputs import classify_path
from sonocl.report.page import GENERATOR, render_page
from sonocl.report.run_sections import Context, run_section
from sonocl.report.score_sections import evaluation_section, segmentation_section


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page `build_report` wrote (its head names sonocl as the generator)."""
    try:
        with open(path, "rb") as handle:
            return GENERATOR.encode("utf-8") in handle.read(4096)
    except OSError:
        return False


def build_report(
    paths: Sequence[Path], out: Path, ctx: Context | None = None, title: str | None = None, overwrite: bool = False
) -> Path:
    """Write the report of ``paths`` to ``out`` (atomically) and return ``out``. An existing ``out`` is replaced only
    when it is a sonocl report, or with ``overwrite`` (`sonocl.outputs.claim_file`)."""
    from sonocl.files import atomic_write_text

    claim_file(out, is_report, overwrite=overwrite)

    ctx = ctx or Context()
    kinds = [(Path(p), classify_path(Path(p))) for p in paths]
    builders = {"evaluation": evaluation_section, "segmentation": segmentation_section}
    sections = [run_section(path, ctx) if kind == "run" else builders[kind](path) for path, kind in kinds]
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    intro = [
        f"sonocl {__version__}, {created}. Inputs: " + "; ".join(f"{kind} {path.resolve()}" for path, kind in kinds)
    ]
    page = render_page(title or "sonocl report: " + ", ".join(path.name for path, _ in kinds), intro, sections)
    atomic_write_text(out, page)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="pretraining run directory, `sonocl evaluate` or `sonocl segment` output (any number)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="HTML file to write (default: %(default)s)"
    )
    parser.add_argument("--title", help="page title (default: the inputs' names)")
    add_overwrite_argument(parser, file=True)
    parser.add_argument(
        "--max-points",
        type=integer(1),
        default=MAX_MAP_POINTS,
        help="frames in the embedding map and the Grad-CAM pool (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=integer(0), default=0, help="seed of the map and the frame subsampling (default: 0)"
    )
    parser.add_argument("--device", default="cpu", help="device for the encoder passes (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    ctx = Context(device=args.device, seed=args.seed, max_points=args.max_points)
    started = time.perf_counter()
    out = build_report(args.paths, args.out, ctx, args.title, overwrite=args.overwrite)  # a ReportError: one line
    size = out.stat().st_size / 1e6
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in ctx.timings.items())
    print(
        f"sonocl report: wrote {out} ({size:.1f} MB, {time.perf_counter() - started:.0f} s{': ' + parts if parts else ''})",
        file=sys.stderr,
    )
    return 0
