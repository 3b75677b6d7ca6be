"""``torch.compile(fullgraph=True)`` through the automatic backend choice (issue 32 item 1): the op and a small
network with ``backend=None``, forward and backward, in one graph with no breaks. The dispatch reads nothing
per call (the order is a trace-time constant, ``dlsn_kernels._dispatch.automatic_order``)."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _dispatch

CPU_REASON = dk.available_backends("cpu")["cpu"].reason
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("DLSN_BACKEND", raising=False)
    _dispatch.reset()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _op_inputs():
    gen = torch.Generator().manual_seed(0)
    n, length, cm, cv, k = 2, 40, 8, 12, 8
    xm, v, lss = (torch.randn(n, length, c, generator=gen, requires_grad=True) for c in (cm, cv, k))
    rot = dk.random_rotations(cm, 2, dk.n_buckets_for(length, k), generator=gen)
    return xm, v, lss, rot, k


def test_the_op_compiles_in_one_graph_with_the_default_backend():
    xm, v, lss, rot, k = _op_inputs()

    def loss(xm, v, lss):
        return dk.gla_attention(xm, v, lss, rot, k).square().sum()

    explained = torch._dynamo.explain(loss)(xm, v, lss)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(xm, v, lss), (xm, v, lss))
    want = torch.autograd.grad(loss(xm, v, lss), (xm, v, lss))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_chunk_attention_compiles_without_breaks():
    xm, v, lss, rot, k = _op_inputs()
    perm = dk.bucket_sort(dk.sblsh_hash(xm.detach(), rot), rot.shape[2])

    def loss(xm, v, lss):
        out, lse = dk.chunk_attention(xm, v, lss, perm, k)
        return dk.combine_rounds(out, lse).sum() + lse.sum()

    explained = torch._dynamo.explain(loss)(xm, v, lss)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_small_network_compiles_fullgraph_forward_and_backward():
    from dlsn.models.gla import GLA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), GLA(16, reduction=2, chunk_size=8, n_hashes=2),
                              torch.nn.Conv2d(16, 3, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)

    def step(x):
        return net(x).square().mean()

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_the_small_preset_compiles_fullgraph_forward_and_backward():
    from dlsn.models.presets import build_model

    torch.manual_seed(0)
    net = build_model("small", 2, n_resgroups=2)  # the preset's blocks, fewer of them: CI time
    x = torch.rand(1, 3, 12, 12)

    def step(x):
        return net(x).abs().mean()

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(x).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
