"""One GPU session: correctness smoke test, determinism, the timing table and a profile, in minutes.

    python -m bench.gpu_session [--out DIR] [--repeats 20] [--skip-512] [--deadline-s 175] [--flex-budget-s 80]

Made for a lent GPU with a few minutes of time (``bench/gpu_session.sh`` builds first, then runs this):

1. Smoke test against the float64 reference at the training shape and one odd shape, in float32 (both
   matmul precisions) and bfloat16: worst relative error of y and of the three gradients, and every element
   of each against its own magnitude (``outliers``: a silently corrupted tile shows); NaN fails. A backend
   that fails at the training shape is left out of the automatic choice and named under the table.
2. Determinism: two backward passes give ``torch.equal`` gradients, per backend.
3. Timing table, CUDA events, median of ``--repeats`` runs: {NLSN-style, DLSN-style, fused triton, fused
   cuda, flex} x {fp32-highest, fp32-high (TF32 on both sides), bf16 autocast (both sides)} x {fwd, fwd+bwd}
   at the training shape, and a 512x512 inference, with GFLOP/s of the attention core and its share of the
   measured matmul ceiling in the same precision. flex is the ``flex`` backend (FlexAttention, compiled; the
   bench's ``flex-gla``): its first call per row compiles, is timed on its own (``compile_s``) and is not in
   the median. flex's rows stop when ``--flex-budget-s`` is spent (compiling is the unknown cost).
4. Steps 1-2 are ``python -m dlsn_kernels.check`` (``dlsn_kernels.check.run``) per precision: its table is in
   the report and its results in the per-user cache (docs/check.md), which the automatic choice reads.
5. A torch.profiler table of the top CUDA kernels of one fused Triton training step (bf16 autocast).
6. The whole network (``network_rows``, bench/network.py): a ``paper`` x2 train step at N=16 48x48 under bf16
   autocast, fused Triton against the same network with DLSN-style attention, and the time and peak memory of
   a 1024x1024 x2 inference of each (an out-of-memory is a row too).

``--deadline-s``: past it, the remaining steps are skipped (rows say so) and the report is still written, so
that the shell's timeout never loses a whole session.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench import cases
from dlsn_kernels import check as dk_check

TRAIN = dict(n=16, h=48, w=48, cm=64, cv=256, k=128, r=3)
ODD = dict(n=3, h=37, w=29, cm=40, cv=72, k=96, r=2)  # L % K != 0, channels not powers of two
BIG = dict(n=1, h=512, w=512, cm=64, cv=256, k=128, r=3)
DEVICE = "cuda"  # --dry-run: "cpu", tiny shapes, the cpu and flex backends (checks this script, not the GPU)
IMPLS = {
    "NLSN-style": "nlsn-style",
    "DLSN-style": "dlsn-style",
    "fused triton": cases.fused_impl("triton"),
    "fused cuda": cases.fused_impl("cuda"),
    "flex": cases.fused_impl("flex"),
}
# Worst relative error (y, gradients) for a backend to pass the smoke test in a precision: a few times what
# tests/helpers.tolerance allows, so that only a broken kernel fails (those are off by O(1) or NaN).
PASS_BOUNDS = {"fp32-highest": (1e-4, 1e-3), "fp32-high": (2e-2, 6e-2), "bf16": (6e-2, 0.25)}
DEADLINE = math.inf  # time.time() past which remaining work is skipped (--deadline-s)
FLEX_BUDGET = {"left_s": math.inf}  # --flex-budget-s, spent by flex rows (compile included)
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


def first_call_s(once: Callable[[], object]) -> float:
    """Seconds of one call, synchronised: a compiling first call."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    once()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


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


def left_out(accuracy: list[dict[str, object]]) -> list[str]:
    """"backend (precision)" of every training-shape smoke row that failed: out of the automatic choice."""
    return sorted({f"{row['backend']} ({precision_label(str(row['dtype']), str(row['precision']))})"
                   for row in accuracy if row.get("shape") == "training" and not passed(row)})


def precision_label(dtype: str, matmul_precision: str) -> str:
    """The backend choice's precision key of a smoke row (bf16, fp32-highest, fp32-high)."""
    return "bf16" if dtype == "bfloat16" else f"fp32-{'highest' if matmul_precision == 'highest' else 'high'}"


def passed(row: dict[str, object]) -> bool:
    if "error" in row or "y" not in row:
        return False
    y_bound, grad_bound = PASS_BOUNDS[precision_label(str(row["dtype"]), str(row["precision"]))]
    grads = [row[k] for k in ("dxm", "dv", "dlss") if k in row]
    return (row["y"] <= y_bound and all(g <= grad_bound for g in grads)  # NaN/inf compare False
            and row.get("outliers", 0) == 0)


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
                started = time.time()
                try:
                    if started > DEADLINE:
                        raise TimeoutError("skipped: --deadline-s reached")
                    if impl == "flex" and FLEX_BUDGET["left_s"] <= 0:
                        raise TimeoutError("skipped: --flex-budget-s spent")
                    once = cases.core_case(case_impl, backward=backward, device=DEVICE, **shape)

                    def run(once=once, prec=prec, ac=ac) -> None:
                        with precision_mode(prec, ac):
                            once()

                    if impl == "flex":  # the first call compiles: timed on its own, kept out of the median
                        row["compile_s"] = first_call_s(run)
                    ms = time_ms(run, repeats)
                    gflop = attention_gflop(**shape, backward=backward)
                    row.update(ms=ms, mb=peak_mb(run), gflops=gflop / (ms * 1e-3),
                               ceiling_pct=100 * gflop / (ms * 1e-3) / (ceilings[label] * 1e3))
                except Exception as exc:  # noqa: BLE001 - an OOM or a failing backend is a result too
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                if impl == "flex":
                    FLEX_BUDGET["left_s"] -= time.time() - started
                once = None
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    for label, value in ceilings.items():
        rows.append({"ceiling": label, "tflops": value})
    return rows


def flex_markdown(timings: list[dict[str, object]]) -> list[str]:
    """flex's first calls (compiles) and its time against our best kernel, per timing row."""
    out: list[str] = []
    compile_rows = [r for r in timings if "compile_s" in r]
    if compile_rows:
        out += ["", "## flex first calls (compile), kept out of the medians", "",
                "| case | pass | mode | first call s |", "|---|---|---|---:|"]
        out += [f"| {r['case']} | {r['pass']} | {r['mode']} | {r['compile_s']:.1f} |" for r in compile_rows]
    ratios = []
    for r in timings:
        if r.get("impl") != "flex" or "ms" not in r:
            continue
        ours = [o["ms"] for o in timings if o.get("impl") in ("fused triton", "fused cuda") and "ms" in o
                and all(o.get(k) == r[k] for k in ("case", "pass", "mode"))]
        if ours:
            ratios.append(f"| {r['case']} | {r['pass']} | {r['mode']} | {r['ms'] / min(ours):.2f}x |")
    if ratios:
        out += ["", "## Our best kernel vs flex (flex ms / best of triton, cuda; target >= 1.5x in bf16)", "",
                "| case | pass | mode | speed-up |", "|---|---|---|---:|", *ratios]
    return out


# ----------------------------------------------------------------------------------------------
# 3b. the whole network (issue 19): a paper x2 train step under bf16 autocast, ours against the same
# network with DLSN-style attention, and the time and peak memory of a 1024x1024 x2 inference

NETWORK = {"preset": "paper", "train_n": 16, "train_size": 48, "infer_size": 1024}  # --dry-run: tiny


def network_rows(repeats: int) -> list[dict[str, object]]:
    """Rows ``{case, impl, ms, mb}`` (or ``error``) of ``bench.network.network_case`` on DEVICE, bf16 autocast."""
    from bench.network import network_case

    backend = "triton" if DEVICE == "cuda" else "cpu"
    preset = NETWORK["preset"]
    shapes = [(f"{preset} x2 train N={NETWORK['train_n']} {NETWORK['train_size']}x{NETWORK['train_size']}",
               dict(size=NETWORK["train_size"], n=NETWORK["train_n"], train=True), repeats),
              (f"{preset} x2 infer {NETWORK['infer_size']}x{NETWORK['infer_size']}",
               dict(size=NETWORK["infer_size"]), max(1, min(repeats, 3)))]
    rows: list[dict[str, object]] = []
    for case_name, kwargs, case_repeats in shapes:
        for impl_label, impl in ((f"fused {backend} bf16", f"fused-{backend}-bf16"), ("DLSN-style bf16",
                                                                                      "dlsn-style-bf16")):
            row: dict[str, object] = {"case": case_name, "impl": impl_label}
            once = None
            try:
                if time.time() > DEADLINE:
                    raise TimeoutError("skipped: --deadline-s reached")
                once = network_case(impl, preset, device=DEVICE, **kwargs)
                row.update(ms=time_ms(once, case_repeats), mb=peak_mb(once))
            except Exception as exc:  # noqa: BLE001 - an OOM is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            once = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    return rows


def network_markdown(rows: list[dict[str, object]]) -> list[str]:
    out = ["", "## Whole network (bf16 autocast; CUDA events, median; peak = max_memory_allocated above the start)",
           "", "| case | impl | ms | peak MB | speed-up vs DLSN-style |", "|---|---|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            out.append(f"| {row['case']} | {row['impl']} | {row['error']} | | |")
            continue
        base = next((r for r in rows if r["case"] == row["case"] and r["impl"] == "DLSN-style bf16" and "ms" in r),
                    None)
        speed = f"{base['ms'] / row['ms']:.2f}x" if base else ""
        out.append(f"| {row['case']} | {row['impl']} | {row['ms']:.1f} | {row['mb']:.0f} | {speed} |")
    return out


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
                   " | ".join(f"{row[k]:.1e}" if k in row else "-" for k in ("y", "dxm", "dv", "dlss")) + " |")
    failed = left_out(accuracy)
    out += ["", "Elements outside the bound (y and every gradient, each element against its own magnitude): " +
            ", ".join(f"{r['backend']} {r['shape']} {r['dtype']}/{r['precision']} {r['outliers']}"
                      for r in accuracy if "outliers" in r),
            "", "Left out of the automatic choice (failed at the training shape): " + (", ".join(failed) or "none")]
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
    """Tiny shapes, the CPU, the cpu and flex backends, float32 modes only: every code path of this script runs
    (flex forward only: it has no CPU backward, so its fwd+bwd rows are errors that say so)."""
    global DEVICE, MODES, IMPLS
    DEVICE = "cpu"
    MODES = MODES[:2]  # fp32-high too, so that the 512x512 inference rows run (at 32x32)
    IMPLS = {"NLSN-style": "nlsn-style", "DLSN-style": "dlsn-style", "fused cpu": cases.fused_impl("cpu"),
             "flex": cases.fused_impl("flex")}
    NETWORK.update(preset="tiny", train_n=2, train_size=16, infer_size=32)
    for shape, small in ((TRAIN, dict(n=2, h=12, w=12, k=32)), (ODD, dict(n=2, h=7, w=9, k=16)),
                         (BIG, dict(h=32, w=32, k=32))):
        shape.update(small)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-512", action="store_true", help="leave out the 512x512 inference")
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda", "flex"])
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="skip what is left after this many seconds and still write the report")
    parser.add_argument("--flex-budget-s", type=float, default=80.0,
                        help="seconds flex may spend (its compiles included) before its remaining rows are skipped")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, cpu and flex backends: checks this script, measures nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        _dry_run_setup()
        args.backends = ["cpu", "flex"]
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu_session needs a CUDA GPU (or --dry-run)")
    else:
        # flex compiles once per shape, dtype, precision and grad mode (about 10 here): above dynamo's default
        # limit of 8, past which it would fall back to eager FlexAttention (dense scores, out of memory at 512)
        for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
                break
    import triton

    global DEADLINE
    start = time.time()
    if args.deadline_s is not None:
        DEADLINE = start + args.deadline_s
    FLEX_BUDGET["left_s"] = args.flex_budget_s
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "none (dry run on the CPU)"
    from dlsn_kernels.targets import target_of

    arch = target_of(torch.device(DEVICE)).arch  # sm_80, sm_90, ... (interpreter in a dry run)
    meta = {"date": datetime.date.today(), "gpu": gpu, "arch": arch, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}
    # 1-2. correctness and determinism: python -m dlsn_kernels.check, once per float32 matmul precision and in
    # bf16; its results go to the per-user cache the automatic choice reads (copied to $OUT by gpu_session.sh)
    accuracy, determinism, check_tables = [], {}, []
    for dtype_label, prec in (("fp32", "highest"), ("fp32", "high"), ("bf16", "highest")):
        if DEVICE == "cpu" and dtype_label != "fp32":
            continue
        if time.time() > DEADLINE:
            break
        with precision_mode(prec, None):
            outcome = dk_check.run(torch.device(DEVICE), [dtype_label], quick=DEVICE == "cpu",
                                   write_cache=DEVICE == "cuda")  # a dry run measures nothing worth keeping
        check_tables.append(f"### {dtype_label} ({prec})\n\n" + dk_check.table(outcome["results"]))
        dtype = "bfloat16" if dtype_label == "bf16" else "float32"
        for backend, result in outcome["results"][dtype_label].items():
            if backend not in args.backends:
                continue
            for shape_name, errors in result["shapes"].items():
                row = {"backend": backend, "shape": shape_name.split(" ")[0],
                       "dtype": dtype, "precision": prec, **{k: v for k, v in errors.items() if k != "passed"}}
                accuracy.append(row)
            if "error" in result:
                accuracy.append({"backend": backend, "shape": "training", "dtype": dtype, "precision": prec,
                                 "error": result["error"]})
            if prec == "highest" and "deterministic" in result:
                determinism[f"{backend} torch.{dtype}"] = result["deterministic"]
    print(f"correctness done in {time.time() - start:.0f} s", flush=True)
    timings = timing_rows(args.repeats, not args.skip_512)
    network = network_rows(min(args.repeats, 5))
    print(f"timings done in {time.time() - start:.0f} s", flush=True)
    try:
        if time.time() > DEADLINE:
            raise TimeoutError("skipped: --deadline-s reached")
        profile = profile_table()
    except Exception as exc:  # noqa: BLE001
        profile = f"profiler failed: {type(exc).__name__}: {exc}"
    report = to_markdown(meta, accuracy, determinism, timings, profile)
    report += "\n".join(network_markdown(network)) + "\n"
    report += "\n".join(flex_markdown(timings)) + "\n"
    report += "\n## python -m dlsn_kernels.check\n\n" + "\n\n".join(check_tables) + "\n"
    report = report.replace("\n## ", f"\n## [{arch}] ")  # every table names the card's architecture
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "session.md").write_text(report)
    (args.out / "session.json").write_text(json.dumps(
        {"meta": {k: str(v) for k, v in meta.items()}, "accuracy": accuracy, "determinism": determinism,
         "timings": timings, "network": network}, indent=1, default=str))
    print(report)
    print(f"written to {args.out}/session.md ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
