"""``python -m bench.dispatch_cost`` runs and reports every row (its numbers are for people, not asserted)."""

from __future__ import annotations

import sys

import pytest
import torch

import dlsn_kernels as dk
from bench import dispatch_cost


@pytest.mark.skipif(not dk.available_backends("cpu")["cpu"].usable, reason="the cpu backend is not built")
def test_dispatch_cost_reports_every_row(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dispatch_cost", "--reps", "4"])
    threads = torch.get_num_threads()
    dispatch_cost.main()
    assert torch.get_num_threads() == threads  # measured at 1 thread, then given back
    out = capsys.readouterr().out
    assert f"dlsn_kernels from {dk.__file__}" in out
    for row in ("decision (select)", "chunk_attention", "gla_attention, no_grad", "gla_attention forward+backward"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert float(line.split()[-6]) > 0  # "<name> <us> us CPU time per call"
