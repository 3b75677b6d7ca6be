"""One GPU session: correctness smoke test, determinism, the timing table and a profile, in minutes.

    python -m bench.gpu_session [--out DIR] [--repeats 20] [--skip-512]

Made for a lent GPU with a few minutes of time (``bench/gpu_session.sh`` builds first, then runs this):

1. Smoke test against the float64 reference at the training shape and one odd shape, in float32 (both
   matmul precisions) and bfloat16: worst relative error of y and of the three gradients; NaN fails.
2. Determinism: two backward passes give ``torch.equal`` gradients, per backend.
3. Timing table, CUDA events, median of ``--repeats`` runs: {NLSN-style, DLSN-style, fused triton, fused
   cuda} x {fp32-highest, fp32-high (TF32 on both sides), bf16 autocast (both sides)} x {fwd, fwd+bwd} at
   the training shape, and a 512x512 inference, with GFLOP/s of the attention core and its share of the
   measured matmul ceiling in the same precision.
4. A torch.profiler table of the top CUDA kernels of one fused Triton training step (bf16 autocast).

Block sizes are fixed (no autotuning), so the minutes go to measuring, not to compiling candidates.
Everything is printed and written under ``--out`` (session.md, session.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench import cases

TRAIN = dict(n=16, h=48, w=48, cm=64, cv=256, k=128, r=3)
ODD = dict(n=3, h=37, w=29, cm=40, cv=72, k=96, r=2)  # L % K != 0, channels not powers of two
BIG = dict(n=1, h=512, w=512, cm=64, cv=256, k=128, r=3)
DEVICE = "cuda"  # --dry-run: "cpu", tiny shapes, the cpu backend (checks this script, not the GPU)
IMPLS = {
    "NLSN-style": "nlsn-style",
    "DLSN-style": "dlsn-style",
    "fused triton": cases.fused_impl("triton"),
    "fused cuda": cases.fused_impl("cuda"),
}
# (label, float32 matmul precision, autocast dtype or None)
MODES = (
    ("fp32-highest", "highest", None),
    ("fp32-high", "high", None),
    ("bf16 autocast", "highest", torch.bfloat16),
)


@contextlib.contextmanager
def precision_mode(matmul_precision: str, autocast: torch.dtype | None) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def attention_gflop(n: int, h: int, w: int, cm: int, cv: int, k: int, r: int, backward: bool) -> float:
    """Dot-product FLOPs of the attention core: per round and query, 3K keys x (S: 2 Cm, P V: 2 Cv); the
    backward adds dV (2 Cv), dP (2 Cv), dK and dQ (2 Cm each) per pair."""
    pairs = n * h * w * r * 3 * k
    forward = pairs * (2 * cm + 2 * cv)
    return (forward + (pairs * (4 * cm + 4 * cv) if backward else 0)) / 1e9


def matmul_ceiling(matmul_precision: str, autocast: torch.dtype | None) -> float:
    """Measured TFLOP/s of one large square matmul in this precision mode (the ceiling for the %)."""
    size = 8192 if DEVICE == "cuda" else 256
    a = torch.randn(size, size, device=DEVICE)
    b = torch.randn(size, size, device=DEVICE)
    with precision_mode(matmul_precision, autocast):
        ms = time_ms(lambda: torch.matmul(a, b), repeats=10)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def time_ms(once: Callable[[], object], repeats: int) -> float:
    once()
    if DEVICE == "cpu":  # --dry-run
        start = time.perf_counter()
        once()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(once: Callable[[], object]) -> float:
    if DEVICE == "cpu":  # --dry-run
        return 0.0
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    once()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# ----------------------------------------------------------------------------------------------
# 1-2. correctness and determinism


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def smoke(backend: str, shape: dict[str, int], dtype: torch.dtype, matmul_precision: str) -> dict[str, float]:
    import dlsn_kernels as dk
    from dlsn_kernels import reference as ref

    n, length, k = shape["n"], shape["h"] * shape["w"], shape["k"]
    gen = torch.Generator().manual_seed(3)
    xm = torch.randn(n, length, shape["cm"], generator=gen, dtype=torch.float64).relu()
    v = torch.randn(n, length, shape["cv"], generator=gen, dtype=torch.float64)
    lss = torch.randn(n, length, k, generator=gen, dtype=torch.float64)
    rot = dk.random_rotations(shape["cm"], shape["r"], dk.n_buckets_for(length, k), generator=gen)
    grad = torch.randn(n, length, shape["cv"], generator=gen, dtype=torch.float64)
    inputs = [t.to(DEVICE, dtype).requires_grad_() for t in (xm, v, lss)]
    with precision_mode(matmul_precision, None):
        y = dk.gla_attention(*inputs, rot.to(DEVICE), k, backend=backend)
        got = torch.autograd.grad(y, inputs, grad.to(DEVICE, dtype))
        # the reference attends with the backend's own codes: a near-tie may hash differently in float64
        perm = dk.bucket_sort(dk.sblsh_hash(inputs[0].detach(), rot.to(DEVICE), backend=backend),
                              rot.shape[2], backend=backend).cpu()
    exact = [t.requires_grad_() for t in (xm, v, lss)]
    want = ref.combine_rounds(*ref.chunk_attention(*exact, perm, k))
    want_g = torch.autograd.grad(want, exact, grad)
    errors = {"y": rel_err(y.detach(), want)}
    errors.update({f"d{name}": rel_err(a, b) for name, a, b in zip(("xm", "v", "lss"), got, want_g)})
    return errors


def deterministic(backend: str, dtype: torch.dtype) -> bool:
    import dlsn_kernels as dk

    shape = TRAIN
    n, length, k = shape["n"], shape["h"] * shape["w"], shape["k"]
    gen = torch.Generator().manual_seed(5)
    xm, v, lss = (torch.randn(n, length, c, generator=gen).to(DEVICE, dtype).requires_grad_()
                  for c in (shape["cm"], shape["cv"], k))
    rot = dk.random_rotations(shape["cm"], shape["r"], dk.n_buckets_for(length, k), generator=gen).to(DEVICE)
    grad = torch.randn(n, length, shape["cv"], generator=gen).to(DEVICE, dtype)
    runs = [torch.autograd.grad(dk.gla_attention(xm, v, lss, rot, k, backend=backend), (xm, v, lss), grad)
            for _ in range(2)]
    return all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------------------------
# 3. timings


def timing_rows(repeats: int, with_big: bool) -> list[dict[str, object]]:
    rows = []
    ceilings = {label: matmul_ceiling(prec, ac) for label, prec, ac in MODES}
    train = f"train N={TRAIN['n']} {TRAIN['h']}x{TRAIN['w']}"
    cases_to_run = [(train, TRAIN, False), (train, TRAIN, True)]
    if with_big:
        cases_to_run.append((f"inference {BIG['h']}x{BIG['w']}", BIG, False))
    for case_name, shape, backward in cases_to_run:
        for label, prec, ac in MODES:
            if case_name.startswith("inference") and label == "fp32-highest":
                continue
            for impl, case_impl in IMPLS.items():
                row: dict[str, object] = {"case": case_name, "pass": "fwd+bwd" if backward else "fwd",
                                          "mode": label, "impl": impl}
                try:
                    once = cases.core_case(case_impl, backward=backward, device=DEVICE, **shape)

                    def run(once=once, prec=prec, ac=ac) -> None:
                        with precision_mode(prec, ac):
                            once()

                    ms = time_ms(run, repeats)
                    gflop = attention_gflop(**shape, backward=backward)
                    row.update(ms=ms, mb=peak_mb(run), gflops=gflop / (ms * 1e-3),
                               ceiling_pct=100 * gflop / (ms * 1e-3) / (ceilings[label] * 1e3))
                except Exception as exc:  # noqa: BLE001 - an OOM or a failing backend is a result too
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                once = None
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    for label, value in ceilings.items():
        rows.append({"ceiling": label, "tflops": value})
    return rows


def profile_table() -> str:
    from torch.profiler import ProfilerActivity, profile

    backend = "triton" if DEVICE == "cuda" else "cpu"
    once = cases.core_case(cases.fused_impl(backend), backward=True, device=DEVICE, **TRAIN)
    activities = [ProfilerActivity.CUDA] if DEVICE == "cuda" else [ProfilerActivity.CPU]
    sort_by = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    with precision_mode("highest", torch.bfloat16 if DEVICE == "cuda" else None):
        once()
        with profile(activities=activities) as prof:
            once()
    return prof.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=50)


# ----------------------------------------------------------------------------------------------
# report


def to_markdown(meta: dict[str, object], accuracy: list[dict[str, object]], determinism: dict[str, object],
                timings: list[dict[str, object]], profile: str) -> str:
    out = ["# GPU session", "", ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
           "## Accuracy vs float64 reference (worst relative error)", "",
           "| backend | shape | dtype | matmul precision | y | dxm | dv | dlss |",
           "|---|---|---|---|---:|---:|---:|---:|"]
    for row in accuracy:
        if "error" in row:
            out.append(f"| {row['backend']} | {row['shape']} | {row['dtype']} | {row['precision']} | "
                       f"{row['error']} | | | |")
            continue
        out.append(f"| {row['backend']} | {row['shape']} | {row['dtype']} | {row['precision']} | " +
                   " | ".join(f"{row[k]:.1e}" for k in ("y", "dxm", "dv", "dlss")) + " |")
    out += ["", "## Determinism (two backward passes, torch.equal)", ""]
    out += [f"- {name}: {value}" for name, value in determinism.items()]
    out += ["", "## Timings (CUDA events, median)", "",
            "| case | pass | mode | impl | ms | peak MB | vs NLSN-style | GFLOP/s | % of matmul ceiling |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in timings:
        if "ceiling" in row:
            continue
        lead = f"| {row['case']} | {row['pass']} | {row['mode']} | {row['impl']} |"
        if "error" in row:
            out.append(f"{lead} {row['error']} | | | | |")
            continue
        base = next((r for r in timings if r.get("impl") == "NLSN-style" and "ms" in r and
                     all(r.get(k) == row[k] for k in ("case", "pass", "mode"))), None)
        speed = f"{base['ms'] / row['ms']:.2f}x" if base else ""
        out.append(f"{lead} {row['ms']:.3f} | {row['mb']:.0f} | {speed} | {row['gflops']:.0f} | "
                   f"{row['ceiling_pct']:.1f} |")
    out += ["", "Matmul ceilings measured in this run (8192^3): " +
            ", ".join(f"{r['ceiling']} {r['tflops']:.0f} TFLOP/s" for r in timings if "ceiling" in r)]
    out += ["", "## Profile: one fused training step (triton, bf16 autocast; cpu in a dry run)", "",
            "```", profile, "```", ""]
    return "\n".join(out)


def _dry_run_setup() -> None:
    """Tiny shapes, the CPU, the cpu backend, float32 modes only: every code path of this script runs."""
    global DEVICE, MODES, IMPLS
    DEVICE = "cpu"
    MODES = MODES[:1]
    IMPLS = {"NLSN-style": "nlsn-style", "DLSN-style": "dlsn-style", "fused cpu": cases.fused_impl("cpu")}
    for shape, small in ((TRAIN, dict(n=2, h=12, w=12, k=32)), (ODD, dict(n=2, h=7, w=9, k=16)),
                         (BIG, dict(h=32, w=32, k=32))):
        shape.update(small)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-512", action="store_true", help="leave out the 512x512 inference")
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU with the cpu backend: checks this script, measures nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        _dry_run_setup()
        args.backends = ["cpu"]
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu_session needs a CUDA GPU (or --dry-run)")
    import triton

    start = time.time()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "none (dry run on the CPU)"
    meta = {"date": datetime.date.today(), "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}
    accuracy, determinism = [], {}
    for backend in args.backends:
        for shape_name, shape in (("training", TRAIN), ("odd", ODD)):
            for dtype, prec in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")):
                if DEVICE == "cpu" and dtype != torch.float32:
                    continue
                row = {"backend": backend, "shape": shape_name, "dtype": str(dtype).replace("torch.", ""),
                       "precision": prec}
                try:
                    row.update(smoke(backend, shape, dtype, prec))
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                    traceback.print_exc()
                accuracy.append(row)
                print(row, flush=True)
        for dtype in (torch.float32, torch.bfloat16)[: 1 if DEVICE == "cpu" else 2]:
            try:
                determinism[f"{backend} {dtype}"] = deterministic(backend, dtype)
            except Exception as exc:  # noqa: BLE001
                determinism[f"{backend} {dtype}"] = f"{type(exc).__name__}: {exc}"
            print("deterministic", backend, dtype, determinism[f"{backend} {dtype}"], flush=True)
    print(f"correctness done in {time.time() - start:.0f} s", flush=True)
    timings = timing_rows(args.repeats, not args.skip_512)
    print(f"timings done in {time.time() - start:.0f} s", flush=True)
    try:
        profile = profile_table()
    except Exception as exc:  # noqa: BLE001
        profile = f"profiler failed: {type(exc).__name__}: {exc}"
    report = to_markdown(meta, accuracy, determinism, timings, profile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "session.md").write_text(report)
    (args.out / "session.json").write_text(json.dumps(
        {"meta": {k: str(v) for k, v in meta.items()}, "accuracy": accuracy, "determinism": determinism,
         "timings": timings}, indent=1, default=str))
    print(report)
    print(f"written to {args.out}/session.md ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
