"""Cost of checking that perm is a permutation, on CPU (bench/NOTES.md, "Cost of the perm check").

    python -m bench.perm_check_cost

Times the public API's check (``dlsn_kernels._checks.check_permutation``: min/max, then a scatter of
True into an [N, R, L] mask) and the CPU kernels' own check (``csrc/cpu/index_checks.cpp``, compiled
here with a one-function binding, since the ops run it inside their kernels), on bucket-sorted perms
at the training shape and at 512x512, with 1 and 2 threads. Min and median of repeated calls.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

import dlsn_kernels as dk
from dlsn_kernels import _checks

ROOT = Path(__file__).resolve().parent.parent
BINDING = """
#include <torch/extension.h>
#include "cpu/cpu_kernels.h"
void check(const at::Tensor& perm) { dlsn::cpu::check_permutation(perm, "perm"); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("check", &check); }
"""
SHAPES = ((4, 48 * 48, 200), (16, 48 * 48, 100), (1, 512 * 512, 40))  # N, L, repetitions; R = 3


def _times_ms(fn, reps: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as build:
        binding = Path(build) / "binding.cpp"
        binding.write_text(BINDING)
        ext = load("dlsn_perm_check_cost", [str(binding), str(ROOT / "csrc" / "cpu" / "index_checks.cpp")],
                   extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O3", "-fopenmp"],
                   extra_ldflags=["-fopenmp"], build_directory=build)
        print("| threads | N | L | R | Python check min / median (ms) | C++ kernel check min / median (ms) |")
        print("|---|---|---|---|---|---|")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n, length, reps in SHAPES:
                codes = torch.randint(0, 64, (n, 3, length), generator=torch.Generator().manual_seed(0))
                perm = dk.reference.bucket_sort(codes)
                py = _times_ms(lambda perm=perm: _checks.check_permutation(perm), reps)
                cpp = _times_ms(lambda perm=perm: ext.check(perm), reps)
                print(f"| {threads} | {n} | {length} | 3 | {py[0]:.3f} / {py[1]:.3f} | {cpp[0]:.3f} / {cpp[1]:.3f} |")


if __name__ == "__main__":
    main()
