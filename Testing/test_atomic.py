"""Atomic files: complete or absent, ordinary permissions, no temp files left behind."""
from __future__ import annotations

import json
import os
import stat

import pytest

from logonet.atomic import atomic_write, ordinary_mode, write_json_atomic


def test_success_replaces_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "metrics.csv"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        tmp.write_text("a,b\n")
    assert target.read_text() == "a,b\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == ordinary_mode() != 0o600
    assert [p.name for p in target.parent.iterdir()] == ["metrics.csv"]


def test_failure_keeps_the_old_file_and_cleans_up(tmp_path):
    target = write_json_atomic({"epoch": 3}, tmp_path / "state.json")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
