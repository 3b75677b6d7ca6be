"""The measuring step shared by the benchmark files: skip rules, timing, peak memory.

``measure`` times a case from :mod:`bench.cases` in this process with pytest-benchmark, then
measures its peak extra memory in a child process (:mod:`bench.memory`) and stores it in
``benchmark.extra_info``. The settings come from ``bench/conftest.py`` (:class:`BenchConfig`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from bench import cases
from bench.memory import MemoryMeasurementError, measure_peak

GB = 1024.0**3


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    device: str
    backends: tuple[str, ...]
    mem_limit_bytes: float
    rounds: int
    measure_memory: bool
    threads: int
    dtype: str = "float32"  # of the attention core's tensors (blocks and networks stay float32)

    def impls(self) -> list[str]:
        """Our fused backends first (GLA, then NLSA without the learned score), then the baselines."""
        ours = [cases.fused_impl(b) for b in self.backends] + [cases.nlsa_impl(b) for b in self.backends]
        return ours + list(cases.CORE_IMPLS_BASELINE)


def skip_unless_backend_runs(impl: str, device: str) -> None:
    """Skips a fused impl whose backend cannot run here, with dlsn_kernels' own reason."""
    backend = cases.backend_of(impl)
    if backend is None or backend == "reference":
        return
    import dlsn_kernels

    status = dlsn_kernels.available_backends(device).get(backend)
    reason = status.reason if status is not None else f"unknown backend {backend!r}"
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def skip_if_too_big(impl: str, estimate_bytes: float, config: BenchConfig) -> None:
    """Skips a materialising implementation whose estimated peak is above the limit."""
    if cases.backend_of(impl) not in (None, "reference"):
        return
    if estimate_bytes > config.mem_limit_bytes:
        pytest.skip(
            f"baseline needs ~{estimate_bytes / GB:.1f} GB (limit {config.mem_limit_bytes / GB:.1f} GB; "
            "raise it with --mem-limit-gb)"
        )


def measure(
    benchmark,
    config: BenchConfig,
    target: str,
    kwargs: dict[str, Any],
    *,
    group: str,
    impl: str,
    label: str,
    pixels: int,
    estimate_bytes: float | None = None,
    heavy: bool = False,
    extra_info: dict[str, Any] | None = None,
    memory_timeout_s: float = 600.0,
) -> None:
    """Times ``target(**kwargs)``'s ``run()`` here, then measures its peak extra memory in a child.

    Stores in ``benchmark.extra_info``: impl, case label, pixel count, the estimate, ``extra_info``, and
    ``peak_extra_mb`` (plus baseline and method) unless memory measurement is off. A ``heavy`` case (outside
    quick mode) gets one timed round with no warm-up, and the child measures its first call: two calls in all.
    """
    builder = getattr(cases, target.partition(":")[2])
    benchmark.group = group
    benchmark.extra_info.update(
        {"impl": impl, "case": label, "pixels": pixels, "device": config.device, "threads": config.threads}
    )
    if estimate_bytes is not None:
        benchmark.extra_info["estimate_mb"] = round(estimate_bytes / 2**20, 1)
    benchmark.extra_info.update(extra_info or {})

    heavy = heavy and not config.quick
    run = builder(**kwargs, device=config.device)
    # One warm-up keeps first-call costs (lazy init) out of the timed rounds, except where a call takes minutes.
    rounds = 1 if config.quick or heavy else config.rounds
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0 if heavy else 1)
    del run
    gc.collect()
    if torch.device(config.device).type == "cuda":
        torch.cuda.empty_cache()

    if config.measure_memory:
        try:
            peak = measure_peak(target, kwargs, config.device, threads=config.threads, warmup=not heavy,
                                timeout_s=memory_timeout_s)
        except MemoryMeasurementError as exc:
            pytest.fail(f"peak memory of {impl} {label}: {exc}")
        benchmark.extra_info.update(peak.as_extra_info())
