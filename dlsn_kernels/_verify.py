"""One backend against the float64 reference on its own device: the errors of every output and gradient and the
outlier count. Shared by ``python -m dlsn_kernels.check`` and the dispatcher's first-use probe; it calls the
backends' ops directly (no dispatch)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import reference, targets
from ._hash_setup import n_buckets_for, random_rotations
from .backends import BACKENDS

# Worst relative error (y, gradients) for a backend to pass, per precision (targets.precision_of): a few times
# what the tests allow, so that only a broken kernel fails (those are off by O(1), or NaN).
BOUNDS = {"fp64": (1e-9, 1e-7), "ieee": (1e-4, 1e-3), "tf32": (2e-2, 6e-2), "bf16": (6e-2, 0.25),
          "fp16": (2e-2, 0.1)}


def make_case(shape: dict[str, int], seed: int = 3) -> dict[str, Any]:
    """float64 CPU inputs of ``shape`` (keys n, length, cm, cv, k, r; ``nlsa``: no learned score), drawn once
    per seed."""
    n, length, k = shape["n"], shape["length"], shape["k"]
    gen = torch.Generator().manual_seed(seed)
    lss = torch.randn(n, length, k, generator=gen, dtype=torch.float64)
    return {"xm": torch.randn(n, length, shape["cm"], generator=gen, dtype=torch.float64).relu(),
            "v": torch.randn(n, length, shape["cv"], generator=gen, dtype=torch.float64),
            "lss": None if shape.get("nlsa") else lss,
            "rot": random_rotations(shape["cm"], shape["r"], n_buckets_for(length, k), generator=gen,
                                    dtype=torch.float64),
            "grad": torch.randn(n, length, shape["cv"], generator=gen, dtype=torch.float64), "k": k}


def gla(name: str, xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, k: int) -> Tensor:
    """``y`` of backend ``name``'s gla_attention (its own autograd)."""
    ops = BACKENDS[name].ops
    return reference.gla_attention(xm, v, lss, rot, k) if ops is None else ops.gla_attention(xm, v, lss, rot, k)[0]


def perm_of(name: str, xm: Tensor, rot: Tensor) -> Tensor:
    ops = BACKENDS[name].ops or reference
    return ops.bucket_sort(ops.sblsh_hash(xm, rot), rot.shape[2])


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def outliers(a: Tensor, b: Tensor, bound: float) -> int:
    """Elements of ``a`` off ``b`` by more than ``bound`` of their own magnitude (floored at the RMS of ``b``),
    every element: a few garbled tiles (Triton issue #9433) hide in a worst error relative to the largest
    element, not in this count. Non-finite elements count too."""
    a, b = a.detach().double(), b.detach().double()
    floor = b.pow(2).mean().sqrt().clamp_min(1e-30)
    return int(((a - b).abs() > bound * torch.maximum(b.abs(), floor)).sum() + (~torch.isfinite(a)).sum())


def leaves(case: dict[str, Any], device: torch.device, dtype: torch.dtype, grad: bool) -> list[Tensor | None]:
    """``[xm, v, lss]`` on ``device`` (``lss`` None in an NLSA case)."""
    return [None if case[n] is None else case[n].to(device, dtype).requires_grad_(grad) for n in ("xm", "v", "lss")]


def accuracy(name: str, case: dict[str, Any], device: torch.device, dtype: torch.dtype,
             backward: bool) -> dict[str, Any]:
    """Worst relative errors of ``y`` (and ``dxm``, ``dv``, ``dlss`` with ``backward``) against float64 on
    ``device``, the outlier count, and ``passed``. The reference attends with the backend's own codes (a
    near-tie may hash differently in float64)."""
    k, rot = case["k"], case["rot"].to(device, dtype)
    xs = leaves(case, device, dtype, backward)
    names = [n for n, t in zip(("xm", "v", "lss"), xs) if t is not None]  # no lss in an NLSA case
    ins = [t for t in xs if t is not None]
    y = gla(name, *xs, rot, k)
    got = torch.autograd.grad(y, ins, case["grad"].to(device, dtype)) if backward else ()
    perm = perm_of(name, xs[0].detach(), rot)
    exact = leaves(case, device, torch.float64, True)
    want = reference.combine_rounds(*reference.chunk_attention(*exact, perm, k))
    want_g = torch.autograd.grad(want, [t for t in exact if t is not None], case["grad"].to(device)) if backward else ()
    y_bound, g_bound = BOUNDS[targets.precision_of(dtype)]
    row: dict[str, Any] = {"y": rel_err(y, want)}
    row.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, got, want_g)})
    row["outliers"] = outliers(y, want, y_bound) + sum(outliers(a, b, g_bound) for a, b in zip(got, want_g))
    row["passed"] = (row["y"] <= y_bound and all(row[f"d{n}"] <= g_bound for n in names if backward)
                     and row["outliers"] == 0)  # NaN and inf compare False: they fail
    return row


PROBE_SHAPE = {"n": 1, "length": 80, "cm": 16, "cv": 32, "k": 16, "r": 2}


def probe(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The first-use probe: one small case, forward and backward, against float64 on ``device``; why it
    failed, or None."""
    try:
        row = accuracy(name, make_case(PROBE_SHAPE, seed=11), device, dtype,
                       backward=device.type in BACKENDS[name].backward_on)
    except Exception as exc:  # noqa: BLE001 - any failure sets the backend aside
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if not row["passed"]:
        return "wrong results: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "passed")
    return None
