"""Offline compile report of the Triton kernels for Hopper (sm_90), on a machine without a GPU.

    python -m bench.compile_report [--json FILE] [--shape N L Cm Cv K R]
    python -m bench.compile_report --cuda      # the CUDA C++ kernels of the built extension

Most of a GPU kernel's speed is decided by its code shape, which needs no GPU to read: whether its dot
products run on tensor cores (HGMMA/wgmma or HMMA/mma.sync in the SASS) or as scalar FFMA, and whether it
fits in registers (no spills, no stack) and in shared memory (227 KB per block on an H100/H200).

How: a stand-in Triton driver reports an sm_90 target, and every kernel launch of the real Triton entry
points (``gla_attention`` forward and backward, ``chunk_attention``) is turned into a compile-only warm-up,
so each kernel is compiled with exactly the block sizes and specialisations a launch at this shape would
use. The cubin is read with the ``cuobjdump`` and ``ptxas`` that Triton's wheel ships. CPU tensors stand in
for CUDA ones (only their dtype, alignment and shape matter to the compiler); nothing is executed on them
except the torch glue between launches.

Run it in a process of its own: the Triton interpreter (``TRITON_INTERPRET=1``) must be off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TRAINING_SHAPE = (16, 48 * 48, 64, 256, 128, 3)  # N, L, Cm, Cv, K, R: the paper's training patch
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
# (label, dtype, float32 matmul precision, the "precision" field)
MODES = (
    ("fp32-highest", torch.float32, "highest", "ieee"),
    ("fp32-tf32", torch.float32, "high", "tf32"),
    ("bf16", torch.bfloat16, "highest", "native"),
    ("fp16", torch.float16, "highest", "native"),
)
_TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA|WGMMA)\b")
_FFMA = re.compile(r"\bFFMA\b")
# one SASS instruction of cuobjdump -sass: "/*0a30*/  @!P0 BRA 0x1230 ;"
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P[T0-9]+\s+)?)([A-Z][A-Z0-9_.]*)([^;]*);")
# a wgmma whose A operand is a register vector "{...}" after the accumulator (not a shared-memory descriptor):
# the pattern of Triton issue #9433, which ptxas 12.x can schedule wrongly (silent corruption on hardware)
_RS_WGMMA = re.compile(r"wgmma\.mma_async[^;]*?\{[^}]*\},\s*\{")


@dataclass
class KernelRecord:
    kernel: str
    dtype: str
    precision: str
    config: dict[str, Any]
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    tensor_core_instructions: int
    ffma_instructions: int
    toolchain: str = ""  # "triton 3.8.0, ptxas 12.9" or the CUDA compiler that built the extension
    sass_instructions: int = 0  # static SASS instructions of the kernel (NOPs left out)
    # the main loop (bench/NOTES.md "Instructions per MMA"): static SASS instructions and tensor-core
    # instructions of the innermost loop that holds the most tensor-core instructions
    main_loop_instructions: int = 0
    main_loop_mma: int = 0
    # how many warps compute each tensor-core tile of the kernel's dots (1: none twice; 2: with chained dots
    # Triton lays warps along M at 16 rows each, so 8 warps on a 64-row tile compute it twice)
    mma_duplication: int = 1
    rs_wgmma: int = 0  # wgmma instructions in the PTX whose A operand comes from registers
    ptxas_warnings: list[str] = field(default_factory=list)

    @property
    def instructions_per_mma(self) -> float | None:
        """Main-loop SASS instructions per tensor-core instruction that does distinct work (bench/NOTES.md;
        None without tensor cores in a loop)."""
        if not self.main_loop_mma:
            return None
        return self.main_loop_instructions * self.mma_duplication / self.main_loop_mma

    @property
    def serialized_wgmma(self) -> bool:
        """ptxas warned C7515: its wgmma pipeline is serialized (each wgmma waits for the previous one)."""
        return any("C7515" in w for w in self.ptxas_warnings)

    @property
    def ok(self) -> bool:
        """Spill-free, no stack, fits in shared memory."""
        return self.spill_bytes == 0 and self.stack_bytes == 0 and self.shared_bytes <= SHARED_LIMIT


def _triton_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in Triton's wheel ({path})")
    return path


class _Sm90StandIn:
    """Just enough of a Triton driver to compile for sm_90 without a GPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def _compile_only(compiled: list[tuple[str, Any, dict[str, Any]]],
                  kernels: set[str] | None = None) -> Iterator[None]:
    """Every Triton launch compiles (for sm_90) and records its kernel instead of running it; with
    ``kernels``, launches of other kernels do nothing (their outputs are never read)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from dlsn_kernels import _checks
    from dlsn_kernels.triton import _common

    original_run = JITFunction.run
    original_checks = _common._check_device, _checks.check_float

    def run(self, *args, grid, warmup, **kwargs):
        if kernels is not None and self.fn.__name__ not in kernels:
            return None
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        # block sizes, and the switches that select a variant (MODE, DV_PASS, FIRST, LAST)
        blocks = {k: v for k, v in kwargs.items()
                  if k.startswith("BLOCK_") or k in ("MODE", "DV_PASS", "FIRST", "LAST")}
        compiled.append((self.fn.__name__, kernel, {**blocks, **options}))
        return kernel

    previous_driver = driver._active  # None until Triton first looks for a GPU
    driver.set_active(_Sm90StandIn())
    JITFunction.run = run
    # CPU tensors stand in for CUDA ones (in the CUDA dtypes)
    _common._check_device = lambda t, name: None
    _checks.check_float = lambda t, name, backend: None
    try:
        yield
    finally:
        JITFunction.run = original_run
        _common._check_device, _checks.check_float = original_checks
        driver.set_active(previous_driver)


def toolchain() -> str:
    """The Triton in this process and the ptxas its wheel ships, e.g. "triton 3.6.0, ptxas 12.8"."""
    import triton

    out = subprocess.run([_triton_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+\.\d+)", out)
    return f"triton {triton.__version__}, ptxas {release.group(1) if release else '?'}"


def sass_shape(sass: str) -> dict[str, int]:
    """Static counts of one kernel's SASS (cuobjdump -sass): all instructions, and the main loop's.

    The main loop is the backward branch (a ``BRA`` to a lower address) whose body [target, branch] holds the
    most tensor-core instructions, the shortest such body on a tie: with the pipelined loops Triton and our
    CUDA kernels emit, that is the steady-state step. NOPs (alignment padding) are not counted.
    """
    code = [(int(addr, 16), op) for addr, _, op, _ in _SASS_LINE.findall(sass) if op != "NOP"]
    branches = [(int(target, 16), int(addr, 16)) for addr, _, op, rest in _SASS_LINE.findall(sass)
                if op.startswith("BRA") and (target := _branch_target(rest)) is not None
                and int(target, 16) < int(addr, 16)]
    best = (0, 0)  # (tensor-core instructions, -instructions) of the best loop body
    for lo, hi in branches:
        body = [op for a, op in code if lo <= a <= hi]
        mma = sum(1 for op in body if _TENSOR_CORE.match(op))
        if mma and (mma, -len(body)) > best:
            best = (mma, -len(body))
    return {"sass_instructions": len(code), "main_loop_instructions": -best[1], "main_loop_mma": best[0]}


def _branch_target(operands: str) -> str | None:
    target = re.search(r"0x([0-9a-f]+)\s*$", operands.strip())
    return target.group(1) if target else None


def ptxas_warnings(ptxas_output: str) -> list[str]:
    """ptxas's warnings and numbered performance notes, e.g. "(C7515) Potential Performance Loss:
    wgmma.mma_async instructions are serialized ..." (printed as "ptxas info": each wgmma then waits for the
    one before it), with the function name left out."""
    found = set()
    for line in ptxas_output.splitlines():
        if re.match(r"\s*ptxas\s+warning", line, re.I) or re.match(r"\s*ptxas\s+info\s*:\s*\([A-Z]\d+\)", line):
            found.add(re.sub(r"\s+in the function '[^']*'", "", line.split(":", 1)[1].strip()))
    return sorted(found)


def mma_duplication(ttgir: str) -> int:
    """The most warps that compute one same output element of a Hopper dot (``warp_group_dot`` in the TTGIR):
    a warpgroup owns 64 rows (16 per warp along M) and ``instrShape[1]`` columns per warp along N."""
    layouts = {name: (int(wm), int(wn), int(n)) for name, wm, wn, n in re.findall(
        r"#(mma\d*) = #\w+\.nvidia_mma<\{[^}]*warpsPerCTA = \[(\d+), (\d+)\], instrShape = \[\d+, (\d+)", ttgir)}
    worst = 1
    for m, n, name in re.findall(r"warp_group_dot [^\n]*-> tensor<(\d+)x(\d+)x\w+, #(mma\d*)>", ttgir):
        if name in layouts:
            wm, wn, instr_n = layouts[name]
            worst = max(worst, max(1, wm * 16 // int(m)) * max(1, wn * instr_n // int(n)))
    return worst


def _resource_usage(cubin: bytes, ptx: str, ttgir: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_triton_tool("cuobjdump"), "-res-usage", cubin_path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_triton_tool("cuobjdump"), "-sass", cubin_path],
                              capture_output=True, text=True, check=True).stdout
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
        arch = target.group(1).rstrip(",") if target else "sm_90a"
        ptxas = subprocess.run([_triton_tool("ptxas"), f"-arch={arch}", "-v", ptx_path, "-o", os.devnull],
                               capture_output=True, text=True)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    log = ptxas.stderr + ptxas.stdout
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "stack_bytes": max(int(stack.group(1)) if stack else 0, int(local.group(1)) if local else 0),
        "spill_bytes": sum(spills),
        "tensor_core_instructions": len(_TENSOR_CORE.findall(sass)),
        "ffma_instructions": len(_FFMA.findall(sass)),
        "rs_wgmma": len(_RS_WGMMA.findall(ptx)),
        "mma_duplication": mma_duplication(ttgir),
        "ptxas_warnings": ptxas_warnings(log),
        **sass_shape(sass),
    }


def _problem(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    from dlsn_kernels.reference import n_buckets_for

    n, length, cm, cv, k, rounds = shape
    # the compiler sees dtype, shape and alignment; the values are never read by a kernel, but the host glue
    # reads xm's magnitude (the forward's overflow check), so xm holds zeros rather than torch.empty's garbage
    xm = torch.zeros(n, length, cm, dtype=dtype)
    v = torch.empty(n, length, cv, dtype=dtype)
    lss = torch.empty(n, length, k, dtype=dtype)
    rot = torch.randn(cm, rounds, n_buckets_for(length, k)).to(dtype)
    return xm, v, lss, rot


def _launches(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Every kernel of a training step: gla_attention forward and backward, and chunk_attention."""
    import dlsn_kernels.triton as tk

    xm, v, lss, rot = _problem(shape, dtype)
    k = shape[4]
    y, lse, perm = tk.gla_attention(xm, v, lss, rot, k)
    perm = torch.arange(shape[1]).expand(shape[0], shape[5], shape[1]).contiguous()  # a valid permutation
    delta = torch.zeros(shape[0], 1, shape[1])
    # compile-only launches leave y and lse unwritten; the backward's host check reads lse's magnitude
    lse = torch.zeros_like(lse)
    tk.attention_backward(y.unsqueeze(1), delta, xm, v, lss, perm, lse.unsqueeze(1), k)
    tk.chunk_attention(xm, v, lss, perm, k)


def compile_kernels(shape: tuple[int, ...] = TRAINING_SHAPE, modes=MODES,
                    kernels: set[str] | None = None) -> list[KernelRecord]:
    """Compile every Triton kernel at ``shape`` for each mode (only ``kernels``, if given); one record per
    distinct (kernel, variant, mode)."""
    records: list[KernelRecord] = []
    tools = toolchain()
    for label, dtype, matmul_precision, precision in modes:
        compiled: list[tuple[str, Any, dict[str, Any]]] = []
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            with _compile_only(compiled, kernels):
                _launches(shape, dtype)
        finally:
            torch.set_float32_matmul_precision(previous)
        seen: set[tuple[str, str]] = set()
        for name, kernel, config in compiled:
            key = (name, json.dumps(config, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            usage = _resource_usage(kernel.asm["cubin"], kernel.asm["ptx"], kernel.asm.get("ttgir", ""))
            records.append(KernelRecord(
                kernel=name, dtype=label, precision=precision, config=config, toolchain=tools,
                shared_bytes=int(kernel.metadata.shared), **usage,
            ))
    return records


_CUDA_DTYPES = {"float": "fp32", "double": "fp64", "c10::BFloat16": "bf16", "c10::Half": "fp16"}


def demangle(names: list[str]) -> list[str]:
    """C++ symbol names made readable by c++filt (unchanged when it is missing)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def cuda_kernels(library: str | None = None, arch: str = "sm_90") -> list[KernelRecord]:
    """The CUDA C++ kernels of the built extension (``dlsn_kernels._C``), read with ``cuobjdump``: one record
    per instantiation for ``arch``, the dtype from its first template argument."""
    if library is None:
        import dlsn_kernels._C as ext

        library = ext.__file__
    usage = subprocess.run([_triton_tool("cuobjdump"), "-arch", arch, "-res-usage", library],
                           capture_output=True, text=True).stdout
    sass = subprocess.run([_triton_tool("cuobjdump"), "-arch", arch, "-sass", library],
                          capture_output=True, text=True).stdout
    resources = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage))
    bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
    mangled = sorted(resources)
    records = []
    for name, readable in zip(mangled, demangle(mangled)):
        kernel = re.search(r"(\w+)(?:<[^()]*>)?\(", readable)
        dtype = re.search(r"<([\w:]+)", readable)
        template = re.search(r"<(.*?)>\s*\(", readable)
        res = resources[name]
        body = bodies.get(name, "")
        fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
        label = _CUDA_DTYPES.get(dtype.group(1), dtype.group(1)) if dtype else "-"
        records.append(KernelRecord(
            kernel=kernel.group(1) if kernel else readable[:40], dtype=label,
            # the *_tc_kernel templates run float32 as TF32 (chosen only when the precision policy allows it)
            precision="native" if label in ("bf16", "fp16") else "tf32" if "_tc_" in readable else "ieee",
            config={"template": template.group(1).replace("c10::", "") if template else ""},
            registers=fields.get("REG", -1), spill_bytes=fields.get("LOCAL", 0), stack_bytes=fields.get("STACK", 0),
            shared_bytes=fields.get("SHARED", 0), tensor_core_instructions=len(_TENSOR_CORE.findall(body)),
            ffma_instructions=len(_FFMA.findall(body)), toolchain="nvcc (dlsn_kernels._C)", **sass_shape(body),
        ))
    return records


def format_table(records: list[KernelRecord]) -> str:
    head = (f"{'kernel':<28} {'mode':<11} {'config':<40} {'regs':>4} {'spill':>5} {'stack':>5} "
            f"{'smem KB':>7} {'TC':>4} {'FFMA':>5} {'SASS':>6} {'loop':>5} {'/MMA':>5} {'RS':>3} warnings")
    lines = [head, "-" * len(head)]
    for r in records:
        config = " ".join(f"{k.replace('BLOCK_', '').replace('num_', '')}={v if isinstance(v, str) else int(v)}"
                          for k, v in r.config.items())
        per_mma = f"{r.instructions_per_mma:.1f}" if r.instructions_per_mma is not None else "-"
        warnings = ",".join(sorted({w[1:6] if w.startswith("(C") else w[:20] for w in r.ptxas_warnings})) or "-"
        lines.append(
            f"{r.kernel:<28} {r.dtype:<11} {config:<40} {r.registers:>4} {r.spill_bytes:>5} {r.stack_bytes:>5} "
            f"{r.shared_bytes / 1024:>7.1f} {r.tensor_core_instructions:>4} {r.ffma_instructions:>5} "
            f"{r.sass_instructions:>6} {r.main_loop_instructions:>5} {per_mma:>5} {r.rs_wgmma:>3} {warnings}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    parser.add_argument("--shape", nargs=6, type=int, metavar=("N", "L", "Cm", "Cv", "K", "R"),
                        default=list(TRAINING_SHAPE), help="problem shape (default: the training shape)")
    parser.add_argument("--cuda", action="store_true",
                        help="report the CUDA C++ kernels of the built extension instead (spill = local memory)")
    parser.add_argument("--modes", nargs="+", choices=[m[0] for m in MODES], default=[m[0] for m in MODES],
                        help="dtype/precision modes to compile (default: all)")
    parser.add_argument("--kernels", nargs="+", metavar="NAME", help="compile only these Triton kernels")
    parser.add_argument("--triton", metavar="DIR",
                        help="compile with the Triton installed in DIR (pip install --target DIR triton==3.6.0), "
                             "in a subprocess with DIR first on PYTHONPATH")
    args = parser.parse_args(argv)
    if args.triton:
        return _rerun_with_triton(args.triton, sys.argv[1:] if argv is None else list(argv))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles real sm_90 code")
    if args.cuda:
        records = cuda_kernels()
        print("CUDA C++ kernels of dlsn_kernels._C, sm_90 code (spill: local memory bytes; TC: HGMMA/HMMA)")
    else:
        modes = [m for m in MODES if m[0] in args.modes]
        records = compile_kernels(tuple(args.shape), modes, set(args.kernels) if args.kernels else None)
        print(f"Triton kernels compiled for sm_90 at N, L, Cm, Cv, K, R = {tuple(args.shape)} with {toolchain()} "
              "(TC: tensor-core instructions; SASS: static instructions; loop, /MMA: main loop's instructions "
              "and per tensor-core instruction; RS: register-A wgmma)")
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "instructions_per_mma": r.instructions_per_mma} for r in records], f, indent=1)
        print(f"wrote {args.json}")
    bad = [r for r in records if not r.ok]
    for r in bad:
        print(f"warning: {r.kernel} ({r.dtype}) spills, uses stack or exceeds shared memory", file=sys.stderr)
    return 0


def _rerun_with_triton(directory: str, argv: list[str]) -> int:
    """This report in a subprocess that imports the Triton of ``directory`` (and its ptxas/cuobjdump)."""
    if not os.path.isfile(os.path.join(directory, "triton", "__init__.py")):
        raise SystemExit(f"no Triton in {directory}: pip install --target {directory} triton==<version>")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--triton":
            skip = True
        elif not a.startswith("--triton="):
            rest.append(a)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.abspath(directory),
                                                                   os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *rest], env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
