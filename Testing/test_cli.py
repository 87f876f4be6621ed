"""The ``logonet`` dispatcher: top-level help lists every command without importing them; errors are one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from logonet import cli, process_setup


def test_top_level_help_lists_every_command_without_importing_them() -> None:
    code = ("import sys\nfrom logonet import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('logonet.') or m == 'torch')\n"
            "print('LOADED', loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out
    assert "LOADED ['logonet.cli', 'logonet.errors', 'logonet.process_setup']" in out  # no torch, no command


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


def _fake_command(monkeypatch, error: BaseException) -> None:
    """A command ``boom`` whose run raises ``error``."""
    import types

    module = types.ModuleType("logonet_test_boom")
    module.configure = lambda parser: parser.add_argument("--flag", default=None)
    module.run = lambda args: (_ for _ in ()).throw(error)
    monkeypatch.setitem(sys.modules, "logonet_test_boom", module)
    monkeypatch.setitem(cli.COMMANDS, "boom", ("logonet_test_boom", "raises"))


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch, capsys) -> None:
    from logonet.errors import UserError

    _fake_command(monkeypatch, UserError("the file is\n  not a volume"))
    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err == "logonet boom: error: the file is not a volume\n"


def test_a_bug_keeps_its_traceback_and_is_logged(monkeypatch, tmp_path, capsys) -> None:
    """Any other exception is not turned into a message: it propagates (Python prints the traceback, exit 1)
    and the traceback is also written to <cache>/logs with the command line."""
    monkeypatch.setenv("LOGONET_CACHE", str(tmp_path))
    _fake_command(monkeypatch, ValueError("a bug, not a user mistake"))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["boom", "--flag", "two words"])
    logs = list((tmp_path / "logs").glob("crash-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert text.startswith("logonet boom --flag 'two words'\n")
    assert "Traceback (most recent call last)" in text and "ValueError: a bug, not a user mistake" in text
    assert str(logs[0]) in capsys.readouterr().err


def test_every_command_is_in_the_interfaces_table():
    """docs/interfaces.md's CLI table names each command and the module behind it (synth had gone missing)."""
    from pathlib import Path

    from logonet.cli import COMMANDS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "interfaces.md").read_text(encoding="utf-8")
    for name, (module, _help) in COMMANDS.items():
        assert f"| {name} | `{module}` |" in doc, name


def test_openmp_wait_policy_is_set_before_torch_loads_and_a_users_choice_wins() -> None:
    """OpenMP reads its wait settings once, when torch is loaded: main() must set them before a command imports
    torch, and leave them alone when the user set one."""
    code = ("import os, sys\nfor name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'):\n    os.environ.pop(name, None)\n"
            "from logonet import cli\nseen = {}\nreal = cli.command_parser\n"
            "def spy(name):\n    seen['policy'] = os.environ.get('GOMP_SPINCOUNT')\n"
            "    seen['torch'] = 'torch' in sys.modules\n    return real(name)\n"
            "cli.command_parser = spy\ncli.main(['evaluate', 'missing_a.nii.gz', 'missing_b.nii.gz'])\n"
            "print('SEEN', seen['policy'], seen['torch'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "SEEN 1000 False" in out
    for users in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "INFINITY"}):
        env = dict(users)
        assert process_setup.apply_openmp_defaults(env) == {} and env == users
    env = {"OMP_NUM_THREADS": "2"}
    assert process_setup.apply_openmp_defaults(env) == {"GOMP_SPINCOUNT": "1000"}
    assert env == {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "1000"}


def test_malloc_keeps_freed_memory_so_large_tensors_cost_no_page_faults() -> None:
    """glibc returns freed blocks over 32 MiB to the system, so every large feature map is faulted in afresh (1.4
    million page faults per LoGoNet-S forward). After retain_freed_memory() a freed 64 MiB tensor's memory is
    reused: once the heap has settled an allocation faults in (almost) nothing, where without it every page faults
    again. A user's own malloc settings win."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = ("import resource, sys, torch\nfrom logonet import process_setup\n"
            "applied = process_setup.retain_freed_memory() if sys.argv[1] == 'retain' else False\n"
            "def faults():\n    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "start = 0\nfor i in range(40):\n"  # a 64 MiB tensor, freed at once; glibc's heap settles in ~30 rounds
            "    start = faults() if i == 30 else start\n    torch.ones(16 * 2 ** 20)\n"
            "print('RESULT', applied, (faults() - start) // 10)\n")
    results = {}
    for mode in ("retain", "default"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}).stdout
        applied, faults = out.split("RESULT")[1].split()
        results[mode] = (applied, int(faults))
    pages = 64 * 2 ** 20 // 4096
    assert results["retain"][0] == "True" and results["retain"][1] < pages // 10, results
    assert results["default"][1] > pages // 2, results  # the cost it removes
    for users in ({"MALLOC_MMAP_MAX_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}):
        assert process_setup.retain_freed_memory(dict(users)) is False
