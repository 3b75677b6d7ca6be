"""The benchmark summary says why a baseline was not run; the default memory limit follows the machine."""

from __future__ import annotations

import builtins

from bench import conftest as bench_conftest
from bench import report
from bench import test_bench_models as models_bench


def _bench(group: str, impl: str, case: str, median_s: float, peak_mb: float) -> dict:
    return {"group": group, "name": f"test[{impl}-{case}]",
            "extra_info": {"impl": impl, "case": case, "pixels": 576, "peak_extra_mb": peak_mb},
            "stats": {"mean": median_s, "median": median_s, "rounds": 1}}


def _results() -> dict:
    tiny, small = (models_bench.model_label(p, models_bench.MODEL_SIZE_QUICK) for p in ("tiny", "small"))
    return {
        "machine_info": {"dlsn_bench": {"device": "cpu", "quick": True}},
        "benchmarks": [
            _bench("scaling-fwd", "fused-cpu", "24x24", 0.002, 1.0),
            _bench("scaling-fwd", "fused-cpu", "512x512", 1.7, 400.0),
            _bench("scaling-fwd", "nlsn-style", "24x24", 0.004, 10.0),
            _bench("model-fwd", "fused-cpu", tiny, 0.01, 5.0),
            _bench("model-fwd", "reference", tiny, 0.02, 50.0),
            _bench("model-fwd", "fused-cpu", small, 0.05, 20.0),
            _bench("gla-fwd", "fused-cpu", "C=32 24x24 K=32 R=2", 0.001, 2.0),
        ],
        "dlsn_skipped": [
            {"test": "test_scaling[nlsn-style-512x512]", "reason": "baseline needs ~7.8 GB (limit 4.0 GB; ...)"},
            {"test": "test_model[small-reference]", "group": "model-fwd", "impl": "reference", "case": small,
             "reason": models_bench.QUICK_REFERENCE_NOTE},
        ],
    }


def test_summary_says_why_a_baseline_was_not_run():
    lines = report.render_summary(_results())
    small = models_bench.model_label("small", models_bench.MODEL_SIZE_QUICK)
    assert small == "small x2 24x24"
    row = next(line for line in lines if line.lstrip().startswith(small))
    assert "not run" in row
    assert f"  reference {small}: not run, quick mode runs the slow reference backend on the first preset only" \
        in lines
    assert "  nlsn-style 512x512: not run, baseline needs ~7.8 GB (limit 4.0 GB; ...)" in lines
    assert "  nlsn-style C=32 24x24 K=32 R=2: not run, no result in this run" in lines
    assert not any("tiny x2" in line and "not run" in line for line in lines)  # its reference ran
    assert all(len(line) <= 120 for line in lines)


def test_available_memory_comes_from_the_machine(monkeypatch):
    from_meminfo = bench_conftest._available_memory_bytes()
    assert from_meminfo > 0
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    from_sysconf = bench_conftest._available_memory_bytes()
    assert 0 < from_sysconf and from_sysconf != 16 * 1024.0**3  # free pages, not the fixed fallback
