"""The benchmark baselines compute what they claim, and the bench tooling measures and reports.

* DLSN-style (the authors' GLA written their way) equals ``dlsn_kernels`` given the same hash
  codes, in float64 on odd sizes with padding and R = 2..3, on every backend that runs here.
* NLSN-style has the expected shapes, hashes into range, and is the DLSN pipeline without ``lss``.
* ``bench.memory`` sees a known allocation; ``bench.report`` renders a synthetic JSON.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dlsn_kernels
from bench import baselines, cases, report
from bench.memory import measure_peak

DTYPE = torch.float64

# (N, H, W, Cm, Cv, K, R): odd sizes, padding shorter and longer than L, nc = 1, 2 and more.
SHAPES = [
    (2, 5, 7, 6, 5, 8, 2),  # L=35, pad 5, nc 5
    (1, 9, 11, 4, 3, 16, 3),  # L=99, pad 13, nc 7
    (2, 3, 5, 5, 4, 16, 3),  # L=15 < K: one chunk, pad 1
    (1, 2, 3, 3, 2, 16, 2),  # L=6, pad 10 > L: padded slots wrap around
    (1, 5, 8, 4, 3, 32, 3),  # L=40, two chunks (c-1 == c+1)
    (1, 8, 8, 4, 5, 16, 3),  # L=64, no padding
]
SHAPE_IDS = [f"N{s[0]}-{s[1]}x{s[2]}-Cm{s[3]}-Cv{s[4]}-K{s[5]}-R{s[6]}" for s in SHAPES]


def _kernel_backends() -> list:
    """``reference`` always; compiled backends that ``dlsn_kernels`` reports for CPU tensors."""
    params = []
    for name, status in dlsn_kernels.available_backends("cpu").items():
        reason = status.reason
        if name in ("cuda", "triton", "flex"):
            continue  # CPU tensors here; the GPU backends (and flex, forward only on CPU) have their own tests
        marks = [] if reason is None else [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


KERNEL_BACKENDS = _kernel_backends()


def _inputs(shape, seed=0):
    n, h, w, cm, cv, k, r = shape
    length = h * w
    gen = torch.Generator().manual_seed(seed)
    xm = torch.randn(n, length, cm, generator=gen, dtype=DTYPE)
    xm[0, 0] = 0.0  # a zero row: the key norm falls back to eps
    v = torch.randn(n, length, cv, generator=gen, dtype=DTYPE)
    lss = torch.randn(n, length, k, generator=gen, dtype=DTYPE)
    n_buckets = dlsn_kernels.n_buckets_for(length, k)
    rot = dlsn_kernels.random_rotations(cm, r, n_buckets, generator=gen, dtype=DTYPE)
    # Codes with many ties, so the stable order matters.
    codes = torch.randint(0, max(n_buckets, 2), (n, r, length), generator=gen)
    perm = dlsn_kernels.reference.bucket_sort(codes, n_buckets)
    return xm, v, lss, rot, perm


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dlsn_style_matches_chunk_attention(shape, backend):
    xm, v, lss, _rot, perm = _inputs(shape)
    k = shape[5]
    out, lse = dlsn_kernels.chunk_attention(xm, v, lss, perm, k, backend=backend)
    ret, bucket_score = baselines.dlsn_attention(xm, v, k, lss=lss, perm=perm, return_rounds=True)
    assert ret.shape == out.shape and bucket_score.shape == lse.shape
    torch.testing.assert_close(ret, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bucket_score, lse.to(DTYPE), rtol=1e-12, atol=1e-12)
    y = baselines.dlsn_attention(xm, v, k, lss=lss, perm=perm)
    torch.testing.assert_close(y, dlsn_kernels.combine_rounds(out, lse), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_dlsn_style_gradients_match(shape, backend):
    """The baseline's backward (autograd through the authors' style) equals the op's backward."""
    k = shape[5]
    xm, v, lss, _rot, perm = _inputs(shape, seed=1)
    grad_y = torch.randn(
        shape[0], shape[1] * shape[2], shape[4], generator=torch.Generator().manual_seed(2), dtype=DTYPE
    )

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (xm, v, lss)]
        fn(*leaves).backward(grad_y)
        return [t.grad for t in leaves]

    ours = grads(
        lambda a, b, c: dlsn_kernels.combine_rounds(*dlsn_kernels.chunk_attention(a, b, c, perm, k, backend=backend))
    )
    theirs = grads(lambda a, b, c: baselines.dlsn_attention(a, b, k, lss=c, perm=perm))
    for name, g_ours, g_theirs in zip(("xm", "v", "lss"), ours, theirs, strict=True):
        torch.testing.assert_close(g_theirs, g_ours, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dlsn_style_hashing_matches_gla_attention(shape, backend):
    """Given the same orthonormal rotations, hash + stable sort + attention equal the fused op."""
    xm, v, lss, rot, _perm = _inputs(shape, seed=3)
    k = shape[5]
    codes = baselines.dlsn_hash(xm, rot)
    torch.testing.assert_close(codes, dlsn_kernels.reference.sblsh_hash(xm, rot), rtol=0, atol=0)
    y = baselines.dlsn_attention(xm, v, k, lss=lss, rot=rot)
    expected = dlsn_kernels.gla_attention(xm, v, lss, rot, k, backend=backend)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_fc_on_every_key_copy_equals_precomputed_lss():
    shape = SHAPES[1]
    xm, v, _lss, _rot, perm = _inputs(shape, seed=4)
    k, cv = shape[5], shape[4]
    torch.manual_seed(0)
    fc = nn.Sequential(nn.Linear(cv, k), nn.ReLU(), nn.Linear(k, k)).to(DTYPE)
    f = torch.randn(xm.shape[0], xm.shape[1], cv, dtype=DTYPE)
    every_copy = baselines.dlsn_attention(xm, v, k, f=f, fc=fc, perm=perm)
    once = baselines.dlsn_attention(xm, v, k, lss=fc(f), perm=perm)
    torch.testing.assert_close(every_copy, once, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_nlsn_style_is_the_pipeline_without_learned_score(shape):
    xm, v, lss, _rot, perm = _inputs(shape, seed=5)
    n, h, w, _cm, cv, k, r = shape
    ret, bucket_score = baselines.nlsn_attention(xm, v, k, perm=perm, return_rounds=True)
    assert ret.shape == (n, r, h * w, cv) and bucket_score.shape == (n, r, h * w)
    out, lse = dlsn_kernels.reference.chunk_attention(xm, v, torch.zeros_like(lss), perm, k)
    torch.testing.assert_close(ret, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bucket_score, lse, rtol=1e-12, atol=1e-12)
    y = baselines.nlsn_attention(xm, v, k, perm=perm)
    assert y.shape == (n, h * w, cv) and torch.isfinite(y).all()


@pytest.mark.parametrize("length,chunk_size,rounds", [(40, 8, 3), (300, 16, 2), (20, 16, 3)])
def test_nlsn_hash_codes_in_range(length, chunk_size, rounds):
    gen = torch.Generator().manual_seed(6)
    xm = torch.randn(2, length, 8, generator=gen)
    n_buckets = baselines.n_buckets_for(length, chunk_size)
    rot_half = baselines.gaussian_rotations(8, rounds, n_buckets, generator=gen)
    assert rot_half.shape == (8, rounds, n_buckets // 2)
    codes = baselines.nlsn_hash(xm, rot_half)
    assert codes.shape == (2, rounds, length) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < max(n_buckets, 1)
    if n_buckets < 2:  # NLSN has no rotation column here: everything in bucket 0
        assert int(codes.max()) == 0
        return
    # argmax over cat[p, -p] is the largest |p_j|: bucket j if p_j > 0, else j + B/2.
    proj = torch.einsum("nlc,crb->nrlb", xm, rot_half)
    j = proj.abs().argmax(dim=-1)
    positive = proj.gather(-1, j.unsqueeze(-1)).squeeze(-1) > 0
    expected = torch.where(positive, j, j + n_buckets // 2)
    assert torch.equal(codes, expected)
    # The sort keeps rounds apart and positions in code order.
    indices, undo_sort = baselines.sort_by_codes(codes, n_buckets)
    assert indices.shape == (2, rounds * length)
    assert torch.equal(indices.gather(1, undo_sort), torch.arange(rounds * length).expand(2, -1))
    sorted_rounds = indices.reshape(2, rounds, length) // length
    assert torch.equal(sorted_rounds, torch.arange(rounds).view(1, -1, 1).expand_as(sorted_rounds))


def test_nlsn_and_dlsn_style_modules():
    torch.manual_seed(7)
    x = torch.randn(2, 16, 6, 7)
    nlsa = baselines.NLSAttention(16, reduction=4, chunk_size=8, n_hashes=3)
    assert nlsa.conv_match[0].kernel_size == (3, 3) and nlsa.conv_assembly[0].kernel_size == (1, 1)
    assert not any(isinstance(m, nn.ReLU) for m in nlsa.modules())
    y = nlsa(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert nlsa.conv_match[0].weight.grad is not None
    gla_style = baselines.DLSNStyleGLA(16, reduction=4, chunk_size=8, n_hashes=2)
    y = gla_style(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_dlsn_style_module_matches_gla_module():
    """Our GLA (reference backend) and the authors-style block agree on the same weights and rotations."""
    from dlsn.models import GLA

    torch.manual_seed(8)
    gla = GLA(8, reduction=2, chunk_size=8, n_hashes=3, backend="reference").to(DTYPE)
    theirs = baselines.DLSNStyleGLA(8, reduction=2, chunk_size=8, n_hashes=3).to(DTYPE)
    theirs.load_state_dict(gla.state_dict())  # same parameter names
    x = torch.randn(1, 8, 5, 7, dtype=DTYPE)
    rot = gla.rotations(35, x.device, generator=torch.Generator().manual_seed(9)).to(DTYPE)
    expected = gla(x, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(theirs(x, rot=rot), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "nlsn-style", "dlsn-style"])
@pytest.mark.parametrize("backward", [False, True])
def test_bench_core_case_runs(impl, backward):
    run = cases.core_case(impl, n=1, h=5, w=7, cm=4, cv=6, k=8, r=2, backward=backward)
    run()
    run()  # a second call works too (grads reset, no graph kept)
    assert cases.estimate_core_bytes(impl, 1, 5, 7, 4, 6, 8, 2, backward) > 0


def test_memory_runner_sees_a_known_allocation():
    peak = measure_peak("bench.cases:allocation_case", {"megabytes": 64})
    assert 60 <= peak.peak_extra_mb <= 80, peak
    assert peak.baseline_mb > 0 and peak.peak_mb >= peak.baseline_mb + peak.peak_extra_mb - 1
    small = measure_peak("bench.cases:allocation_case", {"megabytes": 1})
    assert small.peak_extra_mb < 16, small


def _synthetic_results() -> dict:
    def bench(group, impl, case, pixels, mean_s, peak_mb):
        return {
            "group": group,
            "name": f"test[{impl}-{case}]",
            "fullname": f"bench::test[{impl}-{case}]",
            "params": {"impl": impl},
            "extra_info": {"impl": impl, "case": case, "pixels": pixels, "peak_extra_mb": peak_mb},
            "stats": {"mean": mean_s, "median": mean_s * 0.9, "rounds": 5, "min": mean_s, "max": mean_s},
        }

    return {
        "machine_info": {
            "dlsn_bench": {
                "cpu_model": "Test CPU 9000",
                "cores": 8,
                "torch_threads": 8,
                "torch_version": "9.9",
                "device": "cpu",
                "quick": False,
                "date": "2030-01-01T00:00:00",
            }
        },
        "datetime": "2030-01-01T00:00:00",
        "benchmarks": [
            bench("core-fwd", "fused-cpu", "N=4 48x48", 2304, 0.010, 20.0),
            bench("core-fwd", "nlsn-style", "N=4 48x48", 2304, 0.040, 400.0),
            bench("scaling-fwd", "fused-cpu", "64x64", 4096, 0.002, 5.0),
            bench("scaling-fwd", "nlsn-style", "64x64", 4096, 0.010, 100.0),
            bench("scaling-fwd", "fused-cpu", "128x128", 16384, 0.008, 20.0),
            bench("scaling-fwd", "nlsn-style", "128x128", 16384, 0.040, 400.0),
            bench("model-fwd", "fused-cpu", "tiny x2 128x128", 16384, 0.5, 50.0),
            bench("model-fwd", "reference", "tiny x2 128x128", 16384, 2.0, 500.0),
        ],
        "dlsn_skipped": [{"test": "test_scaling[nlsn-style-512x512]", "reason": "baseline needs ~8.3 GB"}],
    }


def test_report_renders_tables_and_plot(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_synthetic_results()))
    report.main([str(path), "--out-dir", str(tmp_path / "out")])
    markdown = (tmp_path / "out" / "cpu.md").read_text()
    assert "Test CPU 9000, 8 cores" in markdown and "torch 9.9, 8 threads" in markdown
    assert "2030-01-01" in markdown
    assert markdown.index("## core-fwd") < markdown.index("## scaling-fwd") < markdown.index("## model-fwd")
    # fused 10 ms / 20 MB against NLSN-style 40 ms / 400 MB
    assert "| fused-cpu | N=4 48x48 | 10.00 | 9.00 | 5 | 20.0 | 0.25x | 0.05x |" in markdown
    # the model group has no NLSN-style row: ratios are against the reference
    assert "time / reference" in markdown and "| fused-cpu | tiny x2 128x128 | 500.00 |" in markdown
    assert "baseline needs ~8.3 GB" in markdown
    assert "![time and memory against pixel count](cpu_scaling.png)" in markdown
    png = (tmp_path / "out" / "cpu_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
