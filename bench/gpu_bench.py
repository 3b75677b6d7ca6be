"""GPU benchmark: fused Triton and CUDA kernels against NLSN-style and DLSN-style PyTorch.

    python -m bench.gpu_bench [--out bench/results/gpu.md] [--quick]

Cases: the training shape at N=16 (48x48, Cm=64, Cv=256, K=128, R=3), forward and forward+backward,
and one 512x512 inference (N=1, forward under no_grad); inputs, calls and the backward's fixed random
output gradient come from ``bench.cases.core_case``, as in the CPU benchmarks. Time: median of
CUDA-event timings after a warm-up (the first call also compiles/autotunes Triton). Memory:
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (inputs
excluded). An implementation that fails (out of memory, missing backend) gets its error in the table
instead of numbers.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from bench import cases

MB = 1024.0**2


# Table name -> implementation name of bench.cases, which builds the inputs and the call.
IMPLS = {
    "NLSN-style": "nlsn-style",
    "DLSN-style": "dlsn-style",
    "fused triton": cases.fused_impl("triton"),
    "fused cuda": cases.fused_impl("cuda"),
}


def _measure(once: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median ms of ``once`` (a ``bench.cases`` call, which synchronises) and its peak extra MB."""
    once()  # warm-up: Triton compile/autotune, cuBLAS handles
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    once()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / MB
    return statistics.median(times), peak


CASES = ("train-fwd", "train-fwdbwd", "inference")


def run(quick: bool, skip: tuple[str, ...] = (), chosen_cases: tuple[str, ...] = CASES,
        device: str = "cuda") -> list[dict[str, object]]:
    rows = []
    train_n, train_side, big_side = (2, 24, 64) if quick else (16, 48, 512)
    chosen = [
        (f"train N={train_n} {train_side}x{train_side}", train_n, train_side, False),
        (f"train N={train_n} {train_side}x{train_side}", train_n, train_side, True),
        (f"inference N=1 {big_side}x{big_side}", 1, big_side, False),
    ]
    chosen = [case for key, case in zip(CASES, chosen) if key in chosen_cases]
    for name, n, side, backward in chosen:
        for impl, case_impl in IMPLS.items():
            if impl in skip:
                continue
            row = {"case": name, "pass": "fwd+bwd" if backward else "fwd", "impl": impl}
            try:
                once = cases.core_case(case_impl, n, side, side, cm=64, cv=256, k=128, r=3, backward=backward,
                                       device=device)
                ms, mb = _measure(once, repeats=3 if quick else 10)
                row.update(ms=ms, mb=mb)
            except Exception as exc:  # noqa: BLE001 - an OOM or missing backend is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            once = None  # its inputs go before the next implementation is built
            torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "# GPU benchmark",
        "",
        f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Produced by `python -m bench.gpu_bench`.",
        "",
        "| case | pass | impl | ms | peak extra MB | time vs NLSN | memory vs NLSN |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = next(
            (r for r in rows if r["case"] == row["case"] and r["pass"] == row["pass"] and r["impl"] == "NLSN-style"),
            None,
        )
        if "error" in row:
            lines.append(f"| {row['case']} | {row['pass']} | {row['impl']} | {row['error']} | | | |")
            continue
        speed = mem = ""
        if base is not None and "ms" in base:
            speed = f"{base['ms'] / row['ms']:.2f}x"
            mem = f"{base['mb'] / max(row['mb'], 1e-3):.1f}x lower"
        lines.append(
            f"| {row['case']} | {row['pass']} | {row['impl']} | {row['ms']:.2f} | {row['mb']:.0f} | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.md"))
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    parser.add_argument("--skip", nargs="*", default=[], metavar="IMPL",
                        help='implementations to leave out, e.g. "fused cuda" after a failed GPU test')
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_bench needs a CUDA GPU")
    table = to_markdown(run(args.quick, tuple(args.skip), tuple(args.cases)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
