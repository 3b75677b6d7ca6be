"""Module-level benchmarks: one attention block with its convolutions, and whole DLSN networks.

Groups:

* ``gla-fwd``: one block on a 128x128 feature map with the paper model's width (C=256,
  reduction 4, K=128, R=3), eval mode: our ``dlsn.models.GLA`` (fused backend and reference),
  NLSN's ``NLSAttention`` and the authors-style ``DLSNStyleGLA`` (``fc`` on every key copy).
* ``model-fwd``: ``dlsn.models.build_model(preset, 2)`` forward on a 128x128 RGB image (the
  ``tiny`` and ``small`` presets), with our fused backend and with ``reference``.
* ``network``: the whole ``small`` and ``paper`` DLSN x2 against the same network and weights with
  the authors' attention (``dlsn-style``, their unstable sort): train step (forward, L1 loss,
  backward) at N=1 and 4 on 48x48, inference at 96x96, 192x192 and 512x512, ours in float32 and
  under bf16 autocast (``fused-<backend>-bf16``). Cases and method: ``bench/network.py``; a baseline
  estimated above ``--mem-limit-gb`` is skipped. Paper and 512x512 cases run one round, no warm-up.

``--quick`` uses C=32, K=32, R=2 on 24x24 for the block and 24x24 images for the networks, and
runs the (slow) reference backend on the ``tiny`` network only; the ``network`` group runs the
``tiny`` preset (train step on 16x16, inference on 24x24).
"""

from __future__ import annotations

from bench import cases
from bench.harness import measure, skip_if_too_big, skip_unless_backend_runs
from bench.network import measure_network

GLA_BLOCK = {"channels": 256, "size": 128, "k": 128, "r": 3, "reduction": 4}
GLA_BLOCK_QUICK = {"channels": 32, "size": 24, "k": 32, "r": 2, "reduction": 4}

MODEL_PRESETS = ("tiny", "small")
MODEL_SCALE = 2
MODEL_SIZE = 128
MODEL_SIZE_QUICK = 24
MODEL_GROUP = "model-fwd"
# Quick mode times the slow reference backend on the first preset only (bench/conftest.py leaves the rest out).
QUICK_REFERENCE_NOTE = "quick mode runs the slow reference backend on the first preset only"


def model_label(preset: str, size: int) -> str:
    """The case name of a whole-network row, e.g. ``small x2 24x24``."""
    return f"{preset} x{MODEL_SCALE} {size}x{size}"


def test_gla_module(benchmark, bench_config, impl):
    skip_unless_backend_runs(impl, bench_config.device)
    block = GLA_BLOCK_QUICK if bench_config.quick else GLA_BLOCK
    kwargs = {"impl": impl, **block}
    estimate = cases.estimate_gla_bytes(**kwargs)
    skip_if_too_big(impl, estimate, bench_config)
    measure(
        benchmark,
        bench_config,
        "bench.cases:gla_case",
        kwargs,
        group="gla-fwd",
        impl=impl,
        label=f"C={block['channels']} {block['size']}x{block['size']} K={block['k']} R={block['r']}",
        pixels=block["size"] ** 2,
        estimate_bytes=estimate,
    )


def test_model(benchmark, bench_config, model_preset, model_backend):
    # (preset, backend) pairs: MODEL_PRESETS x (our backends + reference), see bench/conftest.py
    preset = model_preset
    impl = "reference" if model_backend == "reference" else cases.fused_impl(model_backend)
    skip_unless_backend_runs(impl, bench_config.device)
    size = MODEL_SIZE_QUICK if bench_config.quick else MODEL_SIZE
    measure(
        benchmark,
        bench_config,
        "bench.cases:model_case",
        {"preset": preset, "scale": MODEL_SCALE, "size": size, "backend": model_backend},
        group=MODEL_GROUP,
        impl=impl,
        label=model_label(preset, size),
        pixels=size * size,
    )


def test_network(benchmark, bench_config, network_case, network_impl):
    # (network_case, network_impl) pairs: bench.network.network_cases / network_impls, see bench/conftest.py
    measure_network(benchmark, bench_config, network_case, network_impl)
