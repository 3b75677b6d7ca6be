"""``python -m dlsn_kernels.check``: what runs on this machine, proved on it (docs/check.md).

    python -m dlsn_kernels.check [--device cuda:0|cpu] [--dtype bf16 fp16 fp32] [--quick] [--json FILE]

Prints the environment (device, capability, shared memory, torch/Triton/CUDA/driver versions, whether the
extension runs on this architecture), then for every backend that runs on the device: the worst relative error
of ``y`` and of the three gradients against a float64 reference on the same device, at the training shape and
at an odd padded shape (also without the learned score: NLSN's ``lss=None``), with the outlier count (every
element against its own magnitude); the forward and forward + backward times (median of n, the first call with
its compile timed apart); and whether two backward runs give ``torch.equal`` gradients. One table, pasteable
into an issue. The results go to the per-user cache (``$XDG_CACHE_HOME/dlsn_kernels/check.json``), from which
the automatic choice of later processes picks the fastest backend that passed and never one that failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import _dispatch, _verify, targets
from .backends import BACKENDS, Inputs

TRAIN = {"n": 16, "length": 48 * 48, "cm": 64, "cv": 256, "k": 128, "r": 3}
ODD = {"n": 3, "length": 37 * 29, "cm": 40, "cv": 72, "k": 96, "r": 2}  # L % K != 0, channels not powers of two
# --quick on the CPU: the same structure, small enough for the float64 reference and Triton's interpreter
QUICK_TRAIN = {"n": 2, "length": 16 * 16, "cm": 32, "cv": 64, "k": 64, "r": 2}
QUICK_ODD = {"n": 1, "length": 13 * 11, "cm": 20, "cv": 36, "k": 48, "r": 2}
# Triton's interpreter runs kernels in numpy, a thousand times slower: its own tiny shapes and one timed run
INTERPRETED = {"n": 1, "length": 8 * 12, "cm": 16, "cv": 16, "k": 32, "r": 2}
INTERPRETED_ODD = {"n": 1, "length": 7 * 11, "cm": 12, "cv": 20, "k": 24, "r": 2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(once: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """``(first call s, median ms of repeats)``: the first call (compile, warm-up) is kept out of the median."""
    _sync(device)
    start = time.perf_counter()
    once()
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(times)


def timings(name: str, case: dict[str, Any], device: torch.device, dtype: torch.dtype, backward: bool,
            repeats: int) -> dict[str, float]:
    """``fwd_ms`` (no graph), and with ``backward`` ``step_ms`` (forward + backward); ``first_s``: compile."""
    k, rot, grad = case["k"], case["rot"].to(device, dtype), case["grad"].to(device, dtype)
    plain = _verify.leaves(case, device, dtype, False)
    leaves = _verify.leaves(case, device, dtype, True)

    def forward() -> None:
        with torch.no_grad():
            _verify.gla(name, *plain, rot, k)

    def step() -> None:
        torch.autograd.grad(_verify.gla(name, *leaves, rot, k), leaves, grad)

    first, fwd = time_ms(forward, device, repeats)
    out = {"first_s": first, "fwd_ms": fwd}
    if backward:
        first, out["step_ms"] = time_ms(step, device, repeats)
        out["first_s"] += first
    return out


def deterministic(name: str, case: dict[str, Any], device: torch.device, dtype: torch.dtype) -> bool:
    """Two backward runs of the same inputs give ``torch.equal`` gradients."""
    leaves = _verify.leaves(case, device, dtype, True)
    rot, grad = case["rot"].to(device, dtype), case["grad"].to(device, dtype)
    runs = [torch.autograd.grad(_verify.gla(name, *leaves, rot, case["k"]), leaves, grad) for _ in range(2)]
    return all(torch.equal(a, b) for a, b in zip(*runs))


def record_check(device: torch.device, dtype: torch.dtype, results: dict[str, dict[str, Any]]) -> Path:
    """Writes one check result into the per-user cache (``python -m dlsn_kernels.check`` calls this)."""
    path = _dispatch.cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
    entries[_dispatch.cache_key(device, dtype)] = {"date": datetime.date.today().isoformat(), "device": str(device),
                                        "backends": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    return path


def environment(device: torch.device) -> dict[str, str]:
    """What the results depend on: the device, its target, the software versions, the extension's build."""
    env = {"device": str(device), "torch": torch.__version__, "triton": _dispatch._version("triton"),
           "python": platform.python_version()}
    if device.type == "cuda":
        target = targets.target_of(device)
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, arch=target.arch, shared_memory_per_block=f"{target.shared_per_block // 1024} KB",
                   cuda=str(torch.version.cuda), hip=str(getattr(torch.version, "hip", None)),
                   driver=_driver_version(), extension_runs_here=_extension_runs(device))
    else:
        env.update(name=_dispatch._cpu_name(), arch=platform.machine(), threads=str(torch.get_num_threads()),
                   extension_runs_here=_extension_runs(device))
    return env


def _driver_version() -> str:
    try:
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return "unknown"


def _extension_runs(device: torch.device) -> str:
    """Whether the compiled extension has kernels for this device's architecture: one tiny hash."""
    reasons = _dispatch.device_reasons(device)["cuda" if device.type == "cuda" else "cpu"]
    if reasons:
        return f"no: {reasons[0]}"
    try:
        xm = torch.ones(1, 4, 2, device=device)
        torch.ops.dlsn.sblsh_hash(xm, torch.ones(2, 1, 2, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - "no kernel image is available" is the answer
        return f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return "yes"


def check_backend(name: str, device: torch.device, dtype: torch.dtype, shapes: dict[str, dict[str, int]],
                  repeats: int) -> dict[str, Any]:
    """One backend in one dtype: accuracy per shape, timings and determinism at the first shape."""
    backend = BACKENDS[name]
    backward = device.type in backend.backward_on
    result: dict[str, Any] = {"backward": backward, "shapes": {}}
    try:
        for label, shape in shapes.items():
            result["shapes"][label] = _verify.accuracy(name, _verify.make_case(shape), device, dtype, backward)
        case = _verify.make_case(next(iter(shapes.values())), seed=5)
        result.update(timings(name, case, device, dtype, backward, repeats))
        if backward:
            result["deterministic"] = deterministic(name, case, device, dtype)
    except Exception as exc:  # noqa: BLE001 - a failing backend is a result
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    result["passed"] = "error" not in result and all(r["passed"] for r in result["shapes"].values())
    return result


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One markdown table: a row per (dtype, backend, shape)."""
    lines = ["| dtype | backend | shape | y | dxm | dv | dlss | outliers | fwd ms | fwd+bwd ms | first call s "
             "| repeatable bwd | result |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for dtype, per_backend in results.items():
        for name, r in per_backend.items():
            verdict = "pass" if r["passed"] else ("error: " + r["error"] if "error" in r else "FAIL")
            for i, (label, a) in enumerate(r["shapes"].items() or [("-", {})]):
                first = i == 0
                timing = [f"{r['fwd_ms']:.2f}" if first and "fwd_ms" in r else "",
                          f"{r['step_ms']:.2f}" if first and "step_ms" in r else "",
                          f"{r['first_s']:.1f}" if first and "first_s" in r else ""]
                repeat = {True: "yes", False: "no"}.get(r.get("deterministic"), "-") if first else ""
                lines.append(f"| {dtype} | {name} | {label} | {_cell(a.get('y'))} | {_cell(a.get('dxm'))} | "
                             f"{_cell(a.get('dv'))} | {_cell(a.get('dlss'))} | {a.get('outliers', '-')} | "
                             f"{' | '.join(timing)} | {repeat} | {verdict if first else ''} |")
            if not r["shapes"]:
                lines.append(f"| {dtype} | {name} | - | - | - | - | - | - | | | | - | {verdict} |")
    return "\n".join(lines)


def run(device: torch.device, dtypes: list[str], quick: bool, repeats: int | None = None,
        write_cache: bool = True) -> dict[str, Any]:
    """The whole check; returns ``{"environment", "results", "seconds", "cache"}``."""
    started = time.perf_counter()
    small = quick and device.type == "cpu"
    odd = QUICK_ODD if small else ODD
    shapes = {"training" if not small else "training (quick)": QUICK_TRAIN if small else TRAIN,
              "odd padded" if not small else "odd padded (quick)": odd,
              # NLSN's attention: the kernels' lss-free variants (no learned score loads, no dlss)
              "odd padded, no lss" if not small else "odd padded, no lss (quick)": {**odd, "nlsa": 1}}
    repeats = repeats or (3 if quick else 10)
    reasons = _dispatch.device_reasons(device)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    cache = None
    for label in dtypes:
        dtype = DTYPES[label]
        per_backend = {}
        for name, backend in BACKENDS.items():
            shape = TRAIN if not small else QUICK_TRAIN
            inputs = Inputs(device, dtype, shape["cm"], shape["cv"], shape["k"], shape["n"], shape["length"],
                            shape["r"])
            if reasons[name] or backend.input_reasons(inputs, "forward"):
                continue
            if name == "triton" and device.type == "cpu":  # the interpreter
                tiny = {"training (interpreter)": INTERPRETED, "odd padded (interpreter)": INTERPRETED_ODD,
                        "odd padded, no lss (interpreter)": {**INTERPRETED_ODD, "nlsa": 1}}
                per_backend[name] = check_backend(name, device, dtype, tiny, 1)
            else:
                per_backend[name] = check_backend(name, device, dtype, shapes, repeats)
            print(f"  {label} {name}: {'pass' if per_backend[name]['passed'] else 'FAIL'}", file=sys.stderr,
                  flush=True)
        results[label] = per_backend
        if write_cache and per_backend:
            record = {n: {k: r.get(k) for k in ("passed", "fwd_ms", "step_ms", "deterministic", "error")}
                      for n, r in per_backend.items()}
            cache = str(record_check(device, dtype, record))
    return {"environment": environment(device), "results": results, "seconds": time.perf_counter() - started,
            "cache": cache}


def report(outcome: dict[str, Any]) -> str:
    env = outcome["environment"]
    lines = ["dlsn_kernels.check", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", table(outcome["results"]), ""]
    device = torch.device(env["device"])
    for label in outcome["results"]:
        _dispatch.reset()  # the automatic choice as a new process will make it, from the cache just written
        lines.append(f"automatic choice for {label}: {_dispatch.backend_summary(device, DTYPES[label])}")
    lines.append(f"checked in {outcome['seconds']:.0f} s; results cached in {outcome['cache'] or '(not written)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlsn_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="precisions to check (default: bf16 fp32 on GPUs, fp32 on the CPU); fp32 follows "
                             "torch.get_float32_matmul_precision() (ieee: 'highest', tf32 otherwise)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; on the CPU also smaller shapes")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per median (default 10, quick 3)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-cache", action="store_true", help="do not write the per-user cache")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and (why := _dispatch.device_reasons(device)["triton"]) and "GPU" in why[0]:
        parser.error(f"--device {device}: {why[0]}")
    dtypes = args.dtype or (["bf16", "fp32"] if device.type == "cuda" else ["fp32"])
    outcome = run(device, dtypes, args.quick, args.repeats, write_cache=not args.no_cache)
    print(report(outcome))
    if args.json is not None:
        args.json.write_text(json.dumps(outcome, indent=1, default=str) + "\n")
    failed = [f"{d} {n}" for d, per in outcome["results"].items() for n, r in per.items() if not r["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
