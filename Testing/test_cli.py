"""The ``logonet`` dispatcher: top-level help lists every command without importing them; errors are one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from logonet import cli


def test_top_level_help_lists_every_command_without_importing_them() -> None:
    code = ("import sys\nfrom logonet import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('logonet.') or m == 'torch')\n"
            "print('LOADED', loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out
    assert "LOADED ['logonet.cli', 'logonet.errors']" in out


def test_no_command_prints_help_and_unknown_command_is_refused(capsys) -> None:
    assert cli.main([]) == 0
    assert "segment" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["segmnet"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'segmnet'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_its_own_help(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: logonet {name}" in capsys.readouterr().out
