"""Static SASS instructions per tensor-core instruction of the CUDA C++ kernels (sm_90), read offline.

For each kernel of the built extension (``dlsn_kernels._C``) or of a cubin, from ``cuobjdump -sass`` and
``cuobjdump -res-usage`` (the ``cuobjdump`` that Triton's wheel ships, or the CUDA toolkit's):

* ``instructions``: static SASS instructions of the whole kernel, NOPs left out;
* ``mma``: HMMA/HGMMA instructions, and ``per_mma`` = instructions / mma (the figure of issue 18's table);
* ``loop_per_mma``: the same ratio inside the main loop, the loop (a backward branch and its target) that holds
  the most tensor-core instructions, the tightest such loop; ``loop_cp_async`` counts its LDGSTS (cp.async);
* ``local_bytes`` / ``stack_bytes`` / ``registers``: from the resource usage.

Static counts are a proxy for the work per step (a loop runs its body once per step; code outside the loop runs
once per block), read without a GPU. Usage: ``python -m bench.cuda_sass_report [--library FILE] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

from bench.compile_report import demangle

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?);")
_BRANCH = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")
_MMA = re.compile(r"\b(HMMA|HGMMA)\b")
_CP_ASYNC = re.compile(r"\bLDGSTS\b")
_DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16"}


@dataclass
class SassRecord:
    kernel: str        # demangled name without namespaces and arguments
    dtype: str         # the first template argument: bf16, fp16, fp32 (TF32 in the *_tc_kernel templates)
    template: str      # all template arguments
    instructions: int
    mma: int
    per_mma: float     # instructions / mma (inf without mma)
    loop_instructions: int
    loop_mma: int
    loop_per_mma: float
    loop_cp_async: int
    registers: int
    stack_bytes: int
    local_bytes: int


def _cuobjdump() -> str:
    """Triton's bundled cuobjdump, else the toolkit's, else the one on PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    for path in ("/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")):
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError("no cuobjdump: install triton or the CUDA toolkit")


def loop_figures(body: str) -> tuple[int, int, int]:
    """(instructions, mma, cp.async) inside the main loop of one kernel's SASS: the loop (backward branch to
    target) holding the most mma, the tightest of those; zeros when no loop holds any."""
    code = [(int(a, 16), text.strip()) for a, text in _INSTRUCTION.findall(body)]
    code = [(a, t) for a, t in code if not t.startswith("NOP")]
    best = (0, 0, 0)  # (mma, -span, start) of the chosen loop
    span_of = None
    for address, text in code:
        m = _BRANCH.search(text)
        if not m or int(m.group(1), 16) > address:
            continue
        lo, hi = int(m.group(1), 16), address
        mma = sum(1 for a, t in code if lo <= a <= hi and _MMA.search(t))
        key = (mma, -(hi - lo), lo)
        if mma > 0 and key > best:
            best, span_of = key, (lo, hi)
    if span_of is None:
        return 0, 0, 0
    lo, hi = span_of
    inside = [t for a, t in code if lo <= a <= hi]
    return len(inside), sum(1 for t in inside if _MMA.search(t)), sum(1 for t in inside if _CP_ASYNC.search(t))


def sass_records(binary: str | None = None, arch: str = "sm_90") -> list[SassRecord]:
    """One record per kernel of ``binary`` (a shared library or cubin; default: the built extension)."""
    if binary is None:
        import dlsn_kernels._C as ext

        binary = ext.__file__
    tool = _cuobjdump()
    arch_args = [] if binary.endswith(".cubin") else ["-arch", arch]
    usage = subprocess.run([tool, *arch_args, "-res-usage", binary], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, *arch_args, "-sass", binary], capture_output=True, text=True).stdout
    resources = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage))
    bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
    names = sorted(bodies)
    records = []
    for name, readable in zip(names, demangle(names)):
        body = bodies[name]
        code = [t.strip() for _, t in _INSTRUCTION.findall(body)]
        code = [t for t in code if not t.startswith("NOP")]
        mma = sum(1 for t in code if _MMA.search(t))
        loop_n, loop_mma, loop_cp = loop_figures(body)
        fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", resources.get(name, ""))}
        kernel = re.search(r"(\w+)(?:<[^()]*>)?\(", readable)
        template = re.search(r"<(.*?)>\s*\(", readable)
        targs = template.group(1).replace("c10::", "") if template else ""
        first = template.group(1).split(",")[0].strip() if template else ""
        records.append(SassRecord(
            kernel=kernel.group(1) if kernel else readable[:40],
            dtype=_DTYPES.get(first, first or "-"), template=targs, instructions=len(code), mma=mma,
            per_mma=len(code) / mma if mma else float("inf"), loop_instructions=loop_n, loop_mma=loop_mma,
            loop_per_mma=loop_n / loop_mma if loop_mma else float("inf"), loop_cp_async=loop_cp,
            registers=fields.get("REG", -1), stack_bytes=fields.get("STACK", 0), local_bytes=fields.get("LOCAL", 0),
        ))
    return records


def format_table(records: list[SassRecord]) -> str:
    head = (f"{'kernel':<32} {'template':<20} {'instr':>6} {'mma':>4} {'per mma':>7} {'loop':>5} {'loop mma':>8} "
            f"{'loop/mma':>8} {'cp.async':>8} {'regs':>4} {'stack':>5} {'local':>5}")
    lines = [head, "-" * len(head)]
    for r in sorted(records, key=lambda r: (r.mma == 0, r.kernel, r.template)):
        per = f"{r.per_mma:7.1f}" if r.mma else f"{'-':>7}"
        loop = f"{r.loop_per_mma:8.1f}" if r.loop_mma else f"{'-':>8}"
        lines.append(f"{r.kernel:<32} {r.template:<20} {r.instructions:>6} {r.mma:>4} {per} {r.loop_instructions:>5} "
                     f"{r.loop_mma:>8} {loop} {r.loop_cp_async:>8} {r.registers:>4} {r.stack_bytes:>5} "
                     f"{r.local_bytes:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_sass_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", metavar="FILE", help="shared library or cubin (default: dlsn_kernels._C)")
    parser.add_argument("--arch", default="sm_90", help="the SASS architecture to read from a library")
    parser.add_argument("--all", action="store_true", help="also list the kernels without tensor-core instructions")
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    args = parser.parse_args(argv)
    records = sass_records(args.library, args.arch)
    if not records:
        print(f"no {args.arch} code found", file=sys.stderr)
        return 1
    shown = records if args.all else [r for r in records if r.mma]
    print(f"static SASS of {args.library or 'dlsn_kernels._C'} ({args.arch}; NOPs not counted)")
    print(format_table(shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (None if v == float("inf") else v) for k, v in asdict(r).items()} for r in records], f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
