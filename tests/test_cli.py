"""Every command's ``--help`` renders (argparse formats help strings with %, so a bare % in one breaks it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sonocl.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_renders(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: sonocl {command}" in capsys.readouterr().out


def test_the_process_command_line_freezes_what_its_command_imported_and_a_call_with_arguments_does_not(
    phantom_store,
) -> None:
    """``sonocl …`` (no ``argv``: the process's own command line) imports its command with the garbage collector
    paused and freezes the objects left (`runtime.import_frozen`); ``main([...])`` from a longer-lived caller leaves
    the collector as it found it. Each in a fresh interpreter, so this test process is not frozen."""
    script = (
        "import gc, sys\nfrom sonocl import cli\nstatus = cli.main({argv})\n"
        "print(status, gc.isenabled(), gc.get_freeze_count() > 0, 'sonocl.data.info' in sys.modules)"
    )
    store = str(phantom_store.root)
    own = subprocess.run([sys.executable, "-c", script.format(argv=""), "info", store], capture_output=True, text=True)
    called = subprocess.run([sys.executable, "-c", script.format(argv=repr(["info", store]))], capture_output=True,
                            text=True)  # fmt: skip
    assert own.stdout.splitlines()[-1].split() == ["0", "True", "True", "True"], own.stderr
    assert called.stdout.splitlines()[-1].split() == ["0", "True", "False", "True"], called.stderr
