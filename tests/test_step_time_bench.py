"""bench/step_time.py: the with/without-GLA step-time table runs and its summary is right."""

from __future__ import annotations

import pytest

from bench import step_time

TINY = ["--steps", "2", "--warmup", "1", "--batch", "1", "--patch", "8", "--feats", "8", "--resblocks", "1",
        "--chunk-size", "8", "--n-hashes", "1", "--backend", "reference", "--threads", "1"]


def test_summary():
    assert step_time.summarise([2.0, 1.0, 4.0]) == {"min": 1.0, "median": 2.0, "max": 4.0, "spread": 4.0}
    with pytest.raises(ValueError):
        step_time.summarise([])


def test_table_has_both_networks(capsys):
    table = step_time.main(TINY)
    assert set(table) == {"with GLA", "without GLA"}
    for row in table.values():
        assert 0 < row["min"] <= row["median"] <= row["max"] and row["spread"] >= 1
    out = capsys.readouterr().out
    assert "load average" in out and "max/min" in out and "with GLA" in out


def test_pair_differs_only_by_the_block():
    pair = step_time.build_pair(8, 2, 8, 1, "reference")
    with_gla, without = (sum(p.numel() for p in net.parameters()) for net in pair.values())
    gla = next(m for m in pair["with GLA"].modules() if type(m).__name__ == "GLA")
    assert with_gla - without == sum(p.numel() for p in gla.parameters())


def test_wait_policies_rerun_in_children(monkeypatch):
    calls = []
    monkeypatch.setattr(step_time.subprocess, "run", lambda cmd, env, check: calls.append((cmd, env)))
    step_time.main(["--wait-policies", "default", "PASSIVE", "--steps", "3"])
    assert [env.get("OMP_WAIT_POLICY") for _, env in calls] == [None, "PASSIVE"]
    assert all(cmd[-3:] == ["bench.step_time", "--steps", "3"] for cmd, _ in calls)
