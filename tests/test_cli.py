"""Every command's ``--help`` renders (argparse formats help strings with %, so a bare % in one breaks it)."""

from __future__ import annotations

import pytest

from sonocl.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_renders(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: sonocl {command}" in capsys.readouterr().out
