"""The `sonocl` command line: one entry point, one sub-command per job.

Each sub-command lives in its own module, which provides
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
Modules are imported only when their command runs, so ``sonocl info`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sonocl._version import __version__
from sonocl.errors import UserError
from sonocl.runtime import import_frozen, keep_freed_memory

COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("sonocl.data.ingest", "decode videos, DICOM cine and images into a frame store"),
    "merge": ("sonocl.data.merge", "join frame stores into one (hard links, no frame copied where it can)"),
    "info": (
        "sonocl.data.info",
        "summarise a frame store (videos, frames, labels, groups, skipped files) or what a run saw",
    ),
    "pretrain": (
        "sonocl.train.cli",
        "self-supervised pretraining (uscl, meta-uscl, awcl, ivpp, simclr, moco, byol, dino, mae)",
    ),
    "evaluate": ("sonocl.evaluate.cli", "grouped k-fold fine-tuning, linear probe and kNN evaluation"),
    "study": ("sonocl.evaluate.study", "per-fold pretraining and evaluation: no encoder sees its test videos"),
    "segment": ("sonocl.evaluate.segment", "U-Net segmentation on a pretrained encoder, grouped k-fold"),
    "embed": ("sonocl.report.embed", "export per-frame embeddings (Parquet or .npz)"),
    "export": ("sonocl.export", "a run's encoder as a self-describing bundle: safetensors, metadata JSON, model card"),
    "report": ("sonocl.report.html", "one self-contained HTML report of a run and/or an evaluation"),
    "demo": ("sonocl.demo", "the whole pipeline on built-in synthetic data (phantom)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: sonocl COMMAND [options]   (sonocl {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`sonocl COMMAND --help` lists the options of a command."]
    return "\n".join(lines)


def _escape_unencodable_output() -> None:
    """A message naming a file whose name is not UTF-8 (held as surrogates) is printed escaped, never a crash: strict
    text streams (stdout in a UTF-8 locale, a capture) are set to escape what they cannot encode, as stderr does."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream: nothing will be printed to it
                pass


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names and return its exit status. Without ``argv`` this is the process's own command
    line (``sonocl``, ``python -m sonocl``): the command's modules are then imported by `runtime.import_frozen`."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"sonocl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[name]
    _escape_unencodable_output()
    keep_freed_memory()
    module = import_frozen(module_name) if own_process else importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"sonocl {name}", description=summary)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as error:  # bad input: one line, no traceback (a traceback is for bugs)
        print(f"sonocl {name}: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
