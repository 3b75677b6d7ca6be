"""The automatic backend per pass: measured on a GPU by ``bench/gpu_session.py``, else today's fixed order.

``bench/results/backend_choice.json`` (or the file named by ``$DLSN_BACKEND_CHOICE``) holds, for each
``"<capability>/<precision>/<pass>"`` (capability ``sm_90``; precision ``bf16``, ``fp16``, ``fp32-highest`` or
``fp32-high``; pass ``fwd``, ``bwd`` or ``bwd-deterministic``), the fastest backend among those that passed
the session's correctness check, and for each ``"<capability>/<precision>"`` which backends' backward passes
were bitwise repeatable (two runs, ``torch.equal``). A case that was never measured falls back to the
order of ``AUTOMATIC_ORDER`` (the same backend for both passes). Under
``torch.use_deterministic_algorithms(True)`` the backward is never a backend whose backward was not bitwise
repeatable, measured or (flex, whose gradients into captured tensors are atomic adds) presumed.

A forward from one backend and a backward from another is :class:`MixedOps`: the forward runs without a
graph and its outputs are saved; the backward is the common formula (DESIGN.md "Backward") of the other
backend, or a recomputation through autograd for the reference and flex backends.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PASSES = ("fwd", "bwd")
# Backends whose backward is not bitwise repeatable unless a session measured otherwise: flex scatters the
# gradients of captured tensors (lss) with atomic adds (pytorch PR #137452).
PRESUMED_NONDETERMINISTIC = frozenset({"flex"})
DEFAULT_TABLE = Path(__file__).resolve().parent.parent / "bench" / "results" / "backend_choice.json"
_DEFAULT_TABLE_STR = str(DEFAULT_TABLE)


def table_path() -> Path:
    return Path(os.environ.get("DLSN_BACKEND_CHOICE") or DEFAULT_TABLE)


@functools.cache
def _load(path: str, mtime: float) -> dict[str, Any]:
    del mtime  # part of the cache key: a rewritten table is read again
    with open(path) as fh:
        table = json.load(fh)
    if not isinstance(table, dict) or not isinstance(table.get("choices"), dict):
        raise ValueError(f"{path} is not a backend choice table (no 'choices' object)")
    return table


def load_table(path: Path | None = None) -> dict[str, Any] | None:
    """The measured table, or None when there is none (a broken file is an error: it was meant to be used).
    One stat per call (every automatic op call asks), parsed again only when the file changes."""
    name = str(path) if path is not None else (os.environ.get("DLSN_BACKEND_CHOICE") or _DEFAULT_TABLE_STR)
    try:
        mtime = os.stat(name).st_mtime
    except OSError:
        return None
    return _load(name, mtime)


def capability(device: torch.device) -> str:
    """``sm_XY`` for a CUDA device, else the device type."""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            major, minor = torch.cuda.get_device_capability(device)
        except (RuntimeError, AssertionError, ValueError):  # a device index that does not exist
            return device.type
        return f"sm_{major}{minor}"
    return device.type


def precision_key(dtype: torch.dtype | None) -> str:
    """The precision a call runs in: bf16, fp16, fp64, or fp32 with the float32 matmul precision."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float64:
        return "fp64"
    return "fp32-highest" if torch.get_float32_matmul_precision() == "highest" else "fp32-high"


@dataclass(frozen=True)
class Choice:
    """The automatic backends of one (device, precision): ``forward`` and ``backward``, and why."""

    forward: str
    backward: str
    source: str  # "measured on DATE (GPU)" or "unmeasured default (order ...)"
    deterministic: bool  # whether ``backward`` is bitwise repeatable (measured, or by design)


def is_deterministic(backend: str, cap: str, precision: str, table: dict[str, Any] | None) -> bool:
    """Whether ``backend``'s backward was bitwise repeatable in the session (presumed when unmeasured)."""
    measured = ((table or {}).get("deterministic") or {}).get(f"{cap}/{precision}") or {}
    if backend in measured:
        return bool(measured[backend])
    return backend not in PRESUMED_NONDETERMINISTIC


def choose(device: torch.device, dtype: torch.dtype | None, order: tuple[str, ...], usable: set[str],
           deterministic: bool | None = None, table: dict[str, Any] | None = None) -> Choice | None:
    """The automatic (forward, backward) on ``device`` for ``dtype``; None when no backend of ``order`` can run.

    ``usable``: the backends that can run on ``device``. A measured entry naming a backend that cannot run
    here (say cuda without the extension) falls back to the order.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if table is None:
        table = load_table()
    cap, precision = capability(device), precision_key(dtype)
    fallback = next((name for name in order if name in usable), None)
    choices = (table or {}).get("choices", {})

    def entry(pass_: str) -> str | None:
        name = (choices.get(f"{cap}/{precision}/{pass_}") or {}).get("backend")
        return name if name in usable else None

    forward = entry("fwd")
    backward = entry("bwd-deterministic" if deterministic else "bwd")
    if backward is not None and deterministic and not is_deterministic(backward, cap, precision, table):
        backward = None
    if forward is None and backward is None:
        if fallback is None:
            return None
        return Choice(fallback, fallback, f"unmeasured default (order {', '.join(order)})",
                      is_deterministic(fallback, cap, precision, table))
    measured_on = f"measured on {table.get('date', '?')} ({table.get('gpu', '?')}, {table_path()})"  # type: ignore[union-attr]
    forward = forward or backward or fallback
    backward = backward or (forward if not deterministic or is_deterministic(forward, cap, precision, table)
                            else fallback)
    assert forward is not None and backward is not None
    return Choice(forward, backward, measured_on, is_deterministic(backward, cap, precision, table))


def write_table(path: Path, choices: dict[str, dict[str, Any]], deterministic: dict[str, dict[str, bool]],
                gpu: str, date: datetime.date | None = None) -> dict[str, Any]:
    """Writes a table in the format :func:`choose` reads (``bench/gpu_session.py`` calls this)."""
    table = {"date": str(date or datetime.date.today()), "gpu": gpu, "torch": torch.__version__,
             "choices": choices, "deterministic": deterministic}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def choices_from_session(fwd_ms: dict[str, dict[str, float]], step_ms: dict[str, dict[str, float]],
                         passed: dict[str, set[str]], deterministic: dict[str, dict[str, bool]],
                         cap: str) -> dict[str, dict[str, Any]]:
    """The table entries of one GPU session, per precision (``fwd_ms[precision][backend]``: forward time,
    ``step_ms``: forward + backward, ``passed[precision]``: backends that passed the correctness check).

    - ``fwd``: the fastest forward.
    - ``bwd``: the backward that makes the cheapest training step after that forward: ``fwd_ms[f] + step_ms[b]
      - fwd_ms[b]`` (b's backward alone), except flex, whose backward after another forward recomputes its own
      (``fwd_ms[f] + step_ms[flex]``); flex after flex is flex's step.
    - ``bwd-deterministic``: the same among backends whose two backward runs were ``torch.equal``.
    """
    entries: dict[str, dict[str, Any]] = {}
    for precision, forward_times in fwd_ms.items():
        runs = {b for b in passed.get(precision, set()) if b in forward_times}  # a forward-only backend counts
        steps = step_ms.get(precision, {})
        ok = {b for b in runs if b in steps}
        if not runs:
            continue
        forward = min(sorted(runs), key=lambda b: forward_times[b])

        def step(b: str, forward: str = forward, steps: dict[str, float] = steps,
                 forward_times: dict[str, float] = forward_times) -> float:
            if b == forward:
                return steps[b]
            if b == "flex":
                return forward_times[forward] + steps[b]
            return forward_times[forward] + steps[b] - forward_times[b]

        key = f"{cap}/{precision}"
        ranking = sorted(runs, key=lambda b: (forward_times[b], b))
        entries[f"{key}/fwd"] = {"backend": forward, "ranking": ranking,
                                 "ms": {b: round(forward_times[b], 4) for b in ranking}}
        repeatable = deterministic.get(key, {})
        for pass_, candidates in (("bwd", ok), ("bwd-deterministic", {b for b in ok if repeatable.get(b, False)})):
            if not candidates:
                continue
            ranking = sorted(candidates, key=lambda b: (step(b), b))
            entries[f"{key}/{pass_}"] = {"backend": ranking[0], "ranking": ranking, "after_forward": forward,
                                         "step_ms": {b: round(step(b), 4) for b in ranking}}
    return entries


# ----------------------------------------------------------------------------------------------
# A forward from one backend, a backward from another.


def _forward_chunk(backend: Any, xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor, k: int) -> tuple[Tensor, Tensor]:
    from . import reference

    if backend.ops is None:
        return reference.chunk_attention(xm, v, lss, perm, k)
    return backend.ops.chunk_attention(xm, v, lss, perm, k)


def _backward(backend: Any, grad_out: Tensor, delta: Tensor, xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor,
              lse: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    from . import flex, reference

    if backend.ops is None:  # the reference differentiates by autograd: recompute it with a graph
        return flex.recompute_backward(reference.chunk_attention, grad_out, delta, xm, v, lss, perm, k)
    return backend.ops.attention_backward(grad_out, delta, xm, v, lss, perm, lse, k)


class _MixedChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fwd: Any, bwd: Any, k: int, xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor):
        with torch.no_grad():
            out, lse = _forward_chunk(fwd, xm, v, lss, perm, k)
        ctx.save_for_backward(xm, v, lss, perm, out, lse)
        ctx.bwd, ctx.k = bwd, k
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor):
        from ._ops import _incoming

        xm, v, lss, perm, out, lse = ctx.saved_tensors
        grad_out, delta = _incoming(grad_out, out, lse, grad_lse)
        dxm, dv, dlss = _backward(ctx.bwd, grad_out, delta, xm, v, lss, perm, lse, ctx.k)
        return None, None, None, dxm, dv, dlss, None


class _MixedGla(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fwd: Any, bwd: Any, k: int, xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor):
        with torch.no_grad():
            out, lse = _forward_chunk(fwd, xm, v, lss, perm, k)
            total = torch.logsumexp(lse, dim=1)
            y = (torch.exp(lse - total.unsqueeze(1)).unsqueeze(-1) * out.to(lse.dtype)).sum(1).to(out.dtype)
        ctx.save_for_backward(xm, v, lss, perm, y, total)
        ctx.bwd, ctx.k = bwd, k
        ctx.mark_non_differentiable(perm)
        return y, total, perm

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_lse: Tensor, _grad_perm: Tensor | None):
        from ._ops import _incoming

        xm, v, lss, perm, y, total = ctx.saved_tensors
        grad_y, delta = _incoming(grad_y, y, total, grad_lse)  # rounds merged: one "round" of grads (R' = 1)
        dxm, dv, dlss = _backward(ctx.bwd, grad_y.unsqueeze(1), delta.unsqueeze(1), xm, v, lss, perm,
                                  total.unsqueeze(1), ctx.k)
        return None, None, None, dxm, dv, dlss, None


class MixedOps:
    """The five ops with the forward of backend ``fwd`` and the backward of backend ``bwd`` (Backend objects).

    The round merge of ``gla_attention`` is done here (DESIGN.md 1.5) on the forward backend's per-round
    outputs: the same numbers as its fused merge within rounding.
    """

    def __init__(self, fwd: Any, bwd: Any) -> None:
        self.fwd, self.bwd = fwd, bwd

    def sblsh_hash(self, xm: Tensor, rot: Tensor) -> Tensor:
        from . import reference

        return reference.sblsh_hash(xm, rot) if self.fwd.ops is None else self.fwd.ops.sblsh_hash(xm, rot)

    def bucket_sort(self, codes: Tensor, n_buckets: int) -> Tensor:
        from . import reference

        if self.fwd.ops is None:
            return reference.bucket_sort(codes, n_buckets)
        return self.fwd.ops.bucket_sort(codes, n_buckets)

    def chunk_attention(self, xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return _MixedChunk.apply(self.fwd, self.bwd, k, xm, v, lss, perm)

    def gla_attention(self, xm: Tensor, v: Tensor, lss: Tensor, rot: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        perm = self.bucket_sort(self.sblsh_hash(xm.detach(), rot), rot.shape[-1])
        return _MixedGla.apply(self.fwd, self.bwd, k, xm, v, lss, perm)

    def attention_backward(self, grad_out: Tensor, delta: Tensor, xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor,
                           lse: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        return _backward(self.bwd, grad_out, delta, xm, v, lss, perm, lse, k)
