"""Per-call cost of the public ops' dispatch on CPU (issue 26: "costs no more per call than today").

    python -m bench.dispatch_cost [--reps 2000]

CPU time (``time.process_time``) per call at 1 thread on tiny inputs (N=1, L=32, Cm=Cv=8, K=16, R=1), where
the kernels take little and the Python around them shows: the decision alone (``_dispatch.select`` with the
automatic order already known), ``chunk_attention`` and ``gla_attention`` forward (with and without autograd
recording) and ``gla_attention`` forward and backward. Best of 5 rounds of ``reps`` calls after a warm-up.
To compare two versions, run it once per checkout side by side, each with ``PYTHONPATH=<checkout>``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import dlsn_kernels as dk
from dlsn_kernels import _dispatch
from dlsn_kernels.backends import Inputs


def per_call_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(max(reps // 10, 1)):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - start) / reps)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000, help="calls per round (the backward runs a quarter)")
    reps = parser.parse_args().reps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _report(reps)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its threads


def _report(reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    xm, v = torch.randn(1, 32, 8, generator=gen).relu(), torch.randn(1, 32, 8, generator=gen)
    lss, rot = torch.randn(1, 32, 16, generator=gen), dk.random_rotations(8, 1, 2, generator=gen)
    perm = dk.bucket_sort(dk.sblsh_hash(xm, rot), 2)
    inputs = Inputs(xm.device, xm.dtype, cm=8, cv=8, chunk_size=16, n=1, length=32, rounds=1)
    trained = lss.clone().requires_grad_()
    rows = {
        "decision (select)": per_call_us(lambda: _dispatch.select(None, inputs, False, "chunk_attention"), reps),
        "chunk_attention": per_call_us(lambda: dk.chunk_attention(xm, v, lss, perm, 16), reps),
        "gla_attention": per_call_us(lambda: dk.gla_attention(xm, v, trained, rot, 16), reps),
    }
    with torch.no_grad():
        rows["gla_attention, no_grad"] = per_call_us(lambda: dk.gla_attention(xm, v, lss, rot, 16), reps)
    rows["gla_attention forward+backward"] = per_call_us(
        lambda: dk.gla_attention(xm, v, trained, rot, 16).sum().backward(), max(reps // 4, 1))
    # which checkout ran: a script run by path imports the installed (editable) package, not the current folder's
    print(f"dlsn_kernels from {dk.__file__}; automatic backend: {dk.backend_summary('cpu')}")
    for name, us in rows.items():
        print(f"{name:32s} {us:8.1f} us CPU time per call")


if __name__ == "__main__":
    main()
