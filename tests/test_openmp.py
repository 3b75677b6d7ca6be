"""One OpenMP runtime: the compiled CPU kernels (at::parallel_for, expanded into ``#pragma omp parallel`` in
the extension) share torch's OpenMP runtime and thread count, so no second thread pool competes with torch's
(issue 32, item 5). Checked in a fresh interpreter: other test modules may load libraries of their own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, os, re
import torch
import dlsn_kernels._C
runtimes = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", line)})
# dlopen by soname returns the runtime already loaded (torch's): its thread count is the one the
# extension's parallel regions get.
omp = ctypes.CDLL("libgomp.so.1") if any("libgomp" in r for r in runtimes) else None
counts = []
for n in (1, 2):
    torch.set_num_threads(n)
    counts.append([torch.get_num_threads(), omp.omp_get_max_threads() if omp else None])
x = torch.randn(1, 300, 8)
rot = dlsn_kernels.random_rotations(8, 2, 4, generator=torch.Generator().manual_seed(0))
dlsn_kernels.gla_attention(x, torch.randn(1, 300, 16), torch.randn(1, 300, 32), rot, 32, backend="cpu")
print(json.dumps({"runtimes": runtimes, "counts": counts}))
"""


def _extension_missing() -> str | None:
    try:
        import dlsn_kernels._C  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
def test_extension_shares_torchs_openmp_runtime_and_thread_count():
    missing = _extension_missing()
    if missing is not None:
        pytest.skip(f"compiled CPU kernels not built: {missing}")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["runtimes"]) == 1, f"more than one OpenMP runtime loaded: {result['runtimes']}"
    if result["counts"][0][1] is not None:
        assert result["counts"] == [[1, 1], [2, 2]]  # the runtime's thread count follows torch.set_num_threads
