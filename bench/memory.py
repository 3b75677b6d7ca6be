"""Peak extra memory of one call, measured in a child process so nothing else pollutes the peak.

A *case* is named by a builder ``"package.module:function"`` and keyword arguments (plain,
picklable values). The child imports the builder and calls it: the builder allocates its inputs
(and model) and returns a ``run()`` callable. Then the child (after a warm-up call, see below)

* CPU: collects garbage, returns freed heap to the OS (glibc ``malloc_trim``), reads its resident
  size ``VmRSS`` (the baseline: interpreter, libraries, inputs), resets the kernel's high-water
  mark with ``/proc/self/clear_refs`` (``5``), calls ``run()`` once and reads ``VmHWM``.
  Peak extra = ``VmHWM - baseline``: every page the call touched beyond what was already
  resident, whichever allocator it came from.
* CUDA: synchronises, resets PyTorch's peak statistics, calls ``run()`` once and reports
  ``max_memory_allocated() - memory_allocated()`` (the caching allocator's bytes, which is what
  decides whether a call fits on the card).

Children come from a ``forkserver`` that has already imported torch, so each case costs a fork,
not an interpreter start; a fresh child per case keeps one case's freed-but-kept memory from
hiding the next case's peak. By default the child calls ``run()`` once as a warm-up and measures
the second call: the steady-state peak of a training step or inference call, without one-time
costs (thread pools, lazy buffers, the autograd engine). On the CPU PyTorch does not cache freed
tensors and the heap is trimmed, so nothing from the warm-up hides in the baseline; on CUDA the
warm-up's cached blocks are not counted by ``memory_allocated``. ``warmup=False`` measures the
first call instead.

Like any ``multiprocessing`` child, the child re-imports the caller's ``__main__`` script (guard
it with ``if __name__ == "__main__"``; a script piped on stdin cannot be re-imported).

Use from Python: ``measure_peak("bench.cases:core_case", {...}, device="cpu")``, or from a shell:
``python -m bench.memory bench.cases:core_case '{"impl": "nlsn-style", ...}'``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import multiprocessing as mp
import os
import traceback
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PeakMemory", "MemoryMeasurementError", "measure_peak", "read_status_kb", "cpu_threads"]

MB = 1024.0 * 1024.0
_PRELOAD = ["torch", "bench.cases"]


class MemoryMeasurementError(RuntimeError):
    """The child process failed or could not measure."""


@dataclass(frozen=True)
class PeakMemory:
    peak_extra_mb: float  # the number to report: peak during run() above the baseline
    baseline_mb: float  # resident (CPU) or allocated (CUDA) before run(): libraries + inputs
    peak_mb: float  # absolute peak: VmHWM (CPU) or max_memory_allocated (CUDA)
    method: str  # how it was measured, for the report
    warmup: bool = True  # True: the second call was measured (steady state)

    def as_extra_info(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def read_status_kb(field: str, pid: str = "self") -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``, ...) of ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise MemoryMeasurementError(f"/proc/{pid}/status has no {field} field")


def cpu_threads() -> int:
    """Threads the benchmarks use: ``DLSN_BENCH_THREADS`` or every core this process may run on."""
    env = os.environ.get("DLSN_BENCH_THREADS")
    if env:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load_builder(target: str):
    module_name, sep, function_name = target.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module_name), function_name)


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so the baseline is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed small blocks may stay counted
        pass


def _measure_cpu(run) -> PeakMemory:
    gc.collect()
    _release_free_heap()
    baseline_kb = read_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current VmRSS
    except OSError as exc:
        raise MemoryMeasurementError(
            f"cannot reset the peak through /proc/self/clear_refs ({exc}); peak memory needs Linux >= 4.0"
        ) from exc
    run()
    peak_kb = read_status_kb("VmHWM")
    return PeakMemory(
        peak_extra_mb=max(peak_kb - baseline_kb, 0) / 1024.0,
        baseline_mb=baseline_kb / 1024.0,
        peak_mb=peak_kb / 1024.0,
        method="VmHWM - VmRSS (child process, clear_refs reset)",
    )


def _measure_cuda(run, torch) -> PeakMemory:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return PeakMemory(
        peak_extra_mb=(peak - baseline) / MB,
        baseline_mb=baseline / MB,
        peak_mb=peak / MB,
        method="torch.cuda.max_memory_allocated - memory_allocated (child process)",
    )


def _child(target: str, kwargs: dict[str, Any], device: str, threads: int, warmup: bool, conn) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        run = _load_builder(target)(**kwargs, device=device)
        if warmup:
            run()  # one-time costs (thread pools, lazy buffers, autograd engine) stay out of the peak
        result = _measure_cuda(run, torch) if device.startswith("cuda") else _measure_cpu(run)
        conn.send(("ok", {**asdict(result), "warmup": warmup}))
    except BaseException:  # report any failure, including MemoryError, to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def measure_peak(
    target: str,
    kwargs: dict[str, Any],
    device: str = "cpu",
    *,
    threads: int | None = None,
    warmup: bool = True,
    timeout_s: float = 600.0,
) -> PeakMemory:
    """Peak extra memory of one ``run()`` of the case ``target(**kwargs, device=device)``.

    Runs in a fresh child process. With ``warmup`` the child calls ``run()`` once before measuring
    the second call (steady state); without, the first call's one-time costs are included.
    Raises :class:`MemoryMeasurementError` with the child's traceback if the case fails there,
    or when the child is killed (for example by the OOM killer).
    """
    _load_builder(target)  # fail early, in the caller, on a wrong name
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_child,
        args=(target, dict(kwargs), device, threads or cpu_threads(), warmup, sender),
        daemon=True,
    )
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            process.kill()
            process.join()
            raise MemoryMeasurementError(f"{target}({kwargs}) did not finish within {timeout_s:.0f} s")
        status, payload = receiver.recv()
    except EOFError as exc:
        process.join()
        raise MemoryMeasurementError(
            f"the child measuring {target}({kwargs}) died with exit code {process.exitcode} (killed for memory?)"
        ) from exc
    finally:
        receiver.close()
    process.join()
    if status != "ok":
        raise MemoryMeasurementError(f"{target}({kwargs}) failed in the child process:\n{payload}")
    return PeakMemory(**payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak extra memory of one benchmark case (child process).")
    parser.add_argument("target", help="builder, 'package.module:function'")
    parser.add_argument("kwargs", nargs="?", default="{}", help="builder keyword arguments as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-warmup", action="store_true", help="measure the first call")
    args = parser.parse_args(argv)
    result = measure_peak(args.target, json.loads(args.kwargs), args.device, warmup=not args.no_warmup)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
