"""Bad-input calls of the compiled CUDA ops, each in its own process, to pin down a crash.

    python -m bench.gpu_error_paths            # on a GPU machine, after building with CUDA

On the first GPU run, ``tests/test_cuda.py::test_errors_name_the_argument`` killed its process with
SIGSEGV where a RuntimeError was expected (``chunk_attention`` given ``lss`` of the wrong width). A
crash takes the rest of a test process with it; here every case runs in a fresh interpreter, so the
table shows exactly which calls raise (and with what message) and which crash. Expected: every row
"raised" with a message naming the argument.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# Each case: a name and the statement that should raise, run after SETUP.
SETUP = """
import torch, dlsn_kernels
torch.manual_seed(0)
n, length, k, cm, cv, r = 2, 16, 4, 7, 9, 2
xm = torch.randn(n, length, cm, device="cuda")
v = torch.randn(n, length, cv, device="cuda")
lss = torch.randn(n, length, k, device="cuda")
perm = torch.arange(length, device="cuda").repeat(n, r, 1).contiguous()
rot = torch.randn(cm, r, 4, device="cuda")
ops = torch.ops.dlsn
"""

CASES = {
    "chunk_attention float64": "ops.chunk_attention(xm.double(), v.double(), lss.double(), perm, k)",
    "chunk_attention lss width": "ops.chunk_attention(xm, v, lss[..., :-1].contiguous(), perm, k)",
    "chunk_attention lss width, no autograd": (
        "with torch.no_grad():\n    ops.chunk_attention(xm, v, lss[..., :-1].contiguous(), perm, k)"
    ),
    "chunk_attention v length": "ops.chunk_attention(xm, v[:, :-1].contiguous(), lss, perm, k)",
    "chunk_attention perm dtype": "ops.chunk_attention(xm, v, lss, perm.float(), k)",
    "chunk_attention rank": "ops.chunk_attention(xm[0], v, lss, perm, k)",
    "gla_attention lss width": "ops.gla_attention(xm, v, lss[..., :-1].contiguous(), rot, k)",
    "sblsh_hash rot rows": "ops.sblsh_hash(xm, rot[1:].contiguous())",
    "bucket_sort n_buckets": "ops.bucket_sort(perm, 0)",
}


def run_case(statement: str) -> tuple[str, str]:
    code = SETUP + "\ntry:\n" + "".join(f"    {line}\n" for line in statement.splitlines())
    code += "except RuntimeError as error:\n    print('RAISED', str(error).splitlines()[0][:100])\n"
    code += "else:\n    print('NO ERROR')\n"
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout.strip().splitlines()
    if proc.returncode < 0:
        return "crashed", f"signal {-proc.returncode}; {proc.stderr.strip().splitlines()[:1]}"
    if out and out[-1].startswith("RAISED"):
        return "raised", out[-1][len("RAISED "):]
    if out and out[-1] == "NO ERROR":
        return "no error", ""
    return f"exit {proc.returncode}", (proc.stderr.strip().splitlines() or [""])[-1][:100]


def main() -> int:
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:  # processes start in parallel: CUDA init is slow
        results = list(pool.map(run_case, CASES.values()))
    failures = 0
    for name, (status, detail) in zip(CASES, results):
        failures += status != "raised"
        print(f"{name:42s} {status:9s} {detail}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
