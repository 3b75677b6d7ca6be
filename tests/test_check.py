"""``python -m dlsn_kernels.check`` on the CPU (issue 26): the environment, one table with every backend that runs
here (reference, cpu, flex forward only, triton under the interpreter), the per-user cache, and the automatic
choice of a new process naming it as its source. Shapes are shrunk so that CI stays fast; the command's own
``--quick`` shapes are exercised by ``test_the_command_runs_as_a_module``'s help only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _dispatch, check

TINY = {"n": 1, "length": 24, "cm": 8, "cv": 8, "k": 8, "r": 2}
TINY_ODD = {"n": 1, "length": 19, "cm": 5, "cv": 7, "k": 6, "r": 2}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name, shape in (("QUICK_TRAIN", TINY), ("QUICK_ODD", TINY_ODD), ("INTERPRETED", TINY),
                        ("INTERPRETED_ODD", TINY_ODD)):
        monkeypatch.setattr(check, name, shape)
    _dispatch.reset()
    yield tmp_path
    _dispatch.reset()


def test_cpu_check_prints_one_table_and_writes_the_cache(tiny, capsys):
    rc = check.main(["--device", "cpu", "--quick", "--repeats", "1", "--json", str(tiny / "out.json")])
    text = capsys.readouterr().out
    here = [name for name, status in dk.available_backends("cpu").items() if status.usable]
    assert rc == 0, text
    assert "| device | cpu |" in text and "| torch | " + torch.__version__ in text
    for name in here:
        assert f"| fp32 | {name} | training (" in text
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in here:
        assert "| fp32 | triton | training (interpreter) |" in text
    flex_row = next(line for line in text.splitlines() if line.startswith("| fp32 | flex | training"))
    assert "| - | - | - |" in flex_row  # forward only: no gradients
    cache = _dispatch.cache_path()
    assert cache.parent == tiny / "cache" / "dlsn_kernels" and cache.exists()
    entries = json.loads(cache.read_text())["entries"]
    (key, entry), = entries.items()
    assert key == _dispatch.cache_key(torch.device("cpu"), torch.float32)
    assert entry["backends"]["cpu"]["passed"] is True and entry["backends"]["cpu"]["step_ms"] > 0
    assert json.loads((tiny / "out.json").read_text())["results"]["fp32"]["cpu"]["passed"]
    _dispatch.reset()  # a new process
    assert "checked on " in dk.available_backends("cpu")["cpu"].automatic
    assert "by dlsn_kernels.check" in dk.backend_summary("cpu")


def test_a_failing_backend_fails_the_check_and_is_never_chosen(tiny, monkeypatch, capsys):
    real = check._verify.accuracy

    def broken_cpu(name, *args, **kwargs):
        row = real(name, *args, **kwargs)
        if name == "cpu":
            row.update(y=0.5, passed=False)
        return row

    monkeypatch.setattr(check._verify, "accuracy", broken_cpu)
    assert check.main(["--device", "cpu", "--quick", "--repeats", "1"]) == 1
    assert "| fp32 | cpu | training (quick) | 5.0e-01 |" in capsys.readouterr().out
    _dispatch.reset()
    with pytest.raises(dk.BackendUnavailableError, match="no backend can run gla_attention"):
        xm, v, lss = (torch.randn(1, 8, 4) for _ in range(3))
        dk.gla_attention(xm, v, lss, dk.random_rotations(4, 1, 2), 4)


def test_the_command_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "dlsn_kernels.check", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--device", "--dtype", "--quick", "--json"):
        assert option in out
