"""Attention core benchmarks: our fused op against the reference and the authors-style baselines.

Groups (one table each in bench/results/<device>.md):

* ``core-fwd`` / ``core-fwdbwd``: the training shape of the paper, N=4 patches of 48x48 LR pixels,
  Cm=64, Cv=256, K=128, R=3; forward without graph, and forward + backward.
* ``scaling-fwd``: inference on one image of 64x64 .. 512x512 positions with the paper model's
  attention dims (C=256: Cm=64, Cv=256, K=128, R=3). Materialising implementations are skipped
  when their estimated peak is above ``--mem-limit-gb``.

``--quick`` shrinks every shape (dims Cm=16, Cv=32, K=32, odd-sized maps with padding).
"""

from __future__ import annotations

import pytest
import torch

from bench import cases
from bench.harness import measure, skip_if_too_big, skip_unless_backend_runs

PAPER_DIMS = {"cm": 64, "cv": 256, "k": 128, "r": 3}
QUICK_DIMS = {"cm": 16, "cv": 32, "k": 32, "r": 3}

TRAIN_SHAPE = {"n": 4, "h": 48, "w": 48, **PAPER_DIMS}
TRAIN_SHAPE_QUICK = {"n": 2, "h": 20, "w": 20, **QUICK_DIMS}  # L=400: 13 chunks, 16 padded slots

SCALING_SIDES = (64, 128, 256, 512)
SCALING_SIDES_QUICK = (16, 24)


def _skip_unless_impl_runs(impl: str, device: str, backward: bool) -> None:
    reason = cases.impl_unavailable_reason(impl, device, backward)
    if reason is not None:
        pytest.skip(f"{impl}: {reason}")  # listed under "Not run" in the report


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_core(benchmark, bench_config, impl, mode):
    skip_unless_backend_runs(impl, bench_config.device)
    shape = TRAIN_SHAPE_QUICK if bench_config.quick else TRAIN_SHAPE
    kwargs = {"impl": impl, **shape, "backward": mode == "fwdbwd", "dtype": bench_config.dtype}
    _skip_unless_impl_runs(impl, bench_config.device, mode == "fwdbwd")
    estimate = cases.estimate_core_bytes(**kwargs, device_type=torch.device(bench_config.device).type)
    skip_if_too_big(impl, estimate, bench_config)
    measure(
        benchmark,
        bench_config,
        "bench.cases:core_case",
        kwargs,
        group=f"core-{mode}",
        impl=impl,
        label=f"N={shape['n']} {shape['h']}x{shape['w']} Cm={shape['cm']} Cv={shape['cv']} "
        f"K={shape['k']} R={shape['r']}",
        pixels=shape["h"] * shape["w"],
        estimate_bytes=estimate,
    )


def test_scaling(benchmark, bench_config, impl, scaling_side):
    # scaling_side: SCALING_SIDES, or SCALING_SIDES_QUICK with --quick (bench/conftest.py)
    skip_unless_backend_runs(impl, bench_config.device)
    side = scaling_side
    dims = QUICK_DIMS if bench_config.quick else PAPER_DIMS
    kwargs = {"impl": impl, "n": 1, "h": side, "w": side, **dims, "dtype": bench_config.dtype}
    _skip_unless_impl_runs(impl, bench_config.device, False)
    estimate = cases.estimate_core_bytes(**kwargs, device_type=torch.device(bench_config.device).type)
    skip_if_too_big(impl, estimate, bench_config)
    measure(
        benchmark,
        bench_config,
        "bench.cases:core_case",
        kwargs,
        group="scaling-fwd",
        impl=impl,
        label=f"{side}x{side}",
        pixels=side * side,
        estimate_bytes=estimate,
    )
