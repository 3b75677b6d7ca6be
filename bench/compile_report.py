"""Offline compile report of the Triton kernels for any GPU target, on a machine without a GPU.

    python -m bench.compile_report [--arch 80 86 89 90 100 120 gfx942 gfx1100] [--json FILE] [--shape N L Cm Cv K R]
                                   [--lss with|without|both] [--kernels hot]
    python -m bench.compile_report --cuda [--arch ...]   # the CUDA C++ kernels of the built extension

Most of a GPU kernel's speed is decided by its code shape, which needs no GPU to read: whether its dot
products run on tensor cores (HGMMA/wgmma or HMMA/mma.sync in the SASS) or as scalar FFMA, and whether it
fits in registers (no spills, no stack) and in shared memory (227 KB per block on an H100/H200).

How: a stand-in Triton driver reports the target (sm_90 by default), and every kernel launch of the real Triton
entry points (``gla_attention`` forward and backward, ``chunk_attention``; with a learned score and, as the
lss-free variants of NLSA, with ``lss=None``, records ``lss`` false) is turned into a compile-only warm-up,
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

from dlsn_kernels.targets import Target, target_for_arch

TRAINING_SHAPE = (16, 48 * 48, 64, 256, 128, 3)  # N, L, Cm, Cv, K, R: the paper's training patch
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (records carry their target's)
ARCHS = ("80", "86", "89", "90", "100", "120")  # the NVIDIA targets of issue 25 (A100 ... RTX 5090)
# (label, dtype, float32 matmul precision, the "precision" field)
MODES = (
    ("fp32-highest", torch.float32, "highest", "ieee"),
    ("fp32-tf32", torch.float32, "high", "tf32"),
    ("bf16", torch.bfloat16, "highest", "native"),
    ("fp16", torch.float16, "highest", "native"),
)
# tensor-core instructions in SASS: HMMA (mma.sync, sm_80+), HGMMA (wgmma, sm_90), UTC*MMA (tcgen05.mma, sm_100:
# UTCHMMA for f16/bf16/tf32, UTCQMMA/UTCOMMA/UTCIMMA for 8-bit, 4-bit and integer kinds)
_TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA|WGMMA|UTC[HQOI]MMA|UTCMMA)\b")
_TCGEN05_MMA = re.compile(r"\btcgen05\.mma\b")
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
    arch: str = "sm_90"  # the target compiled for: sm_80 ... sm_120, gfx942, gfx1100
    shared_limit: int = SHARED_LIMIT  # that target's shared memory (LDS) per block, bytes
    tcgen05_mma: int = 0  # tcgen05.mma instructions in the PTX (Blackwell's tensor cores, sm_100)
    # multiply-adds of distinct tensor-core work per main-loop step, from the configuration (the dots of one
    # iteration of the kernel's step loop, channel blocks padded): the same on every target, so the main loop's
    # instructions per kFLOP compare mma.sync (16x8x16), wgmma (64xNx16) and tcgen05 (up to 128xNx16) fairly
    step_macs: int = 0
    # multiply-adds of the main loop's tensor-core instructions, from their SASS shapes (HMMA.16816,
    # HGMMA.64x32x16; 0 where the shape is not in the mnemonic, UTC*MMA): a check that the loop is one step
    main_loop_sass_macs: int = 0
    # dlsn_kernels.targets.shared_estimate of the kernel's configuration (the bound the launch code checks against
    # the card's shared memory; must not be below shared_bytes); 0 for kernels without a shared-memory model
    shared_estimate: int = 0
    sgprs: int = 0  # AMD: scalar registers (``registers`` holds the VGPRs)
    # False for the lss-free variant (HAS_LSS=False: NLSA, no learned-score loads, no dlss) of a kernel that reads the
    # learned score; True for every other record (kernels without the switch are the same for both)
    lss: bool = True

    @property
    def instructions_per_kflop(self) -> float | None:
        """Main-loop SASS instructions per 1000 FLOPs (2 per multiply-add) of distinct tensor-core work per step
        (None without tensor cores in a loop): comparable across targets, unlike instructions per MMA."""
        if not self.main_loop_mma or not self.step_macs:
            return None
        return self.main_loop_instructions / (2 * self.step_macs / 1000)

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
        """Spill-free, no stack, fits in its target's shared memory."""
        return self.spill_bytes == 0 and self.stack_bytes == 0 and self.shared_bytes <= self.shared_limit


def _triton_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in Triton's wheel ({path})")
    return path


class _StandInDriver:
    """Just enough of a Triton driver to compile for one target without a GPU."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        if self.target.vendor == "amd":
            return GPUTarget("hip", self.target.arch, self.target.warp_size)
        major, minor = self.target.capability
        return GPUTarget("cuda", major * 10 + minor, self.target.warp_size)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def _compile_only(compiled: list[tuple[str, Any, dict[str, Any], bool]], target: Target,
                  kernels: set[str] | None = None) -> Iterator[None]:
    """Every Triton launch compiles for ``target`` and records its kernel instead of running it; with
    ``kernels``, launches of other kernels do nothing (their outputs are never read). The launch code sees
    ``target`` as its device's target, so it picks the configuration a launch on that card would."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from dlsn_kernels import _checks
    from dlsn_kernels.triton import _common

    original_run = JITFunction.run
    touched: set[Any] = set()
    original_checks = _common._check_device, _checks.check_float
    original_target = _common._launch_target

    def run(self, *args, grid, warmup, **kwargs):
        if kernels is not None and self.fn.__name__ not in kernels:
            return None
        if self not in touched:
            # Triton keeps one backend and target per device index, fixed at the first launch: drop it, or every
            # target after the first in this process would compile for the first one
            self.device_caches.clear()
            touched.add(self)
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim")
                   if k in kwargs}
        # block sizes, and the switches that select a variant (MODE, DV_PASS, FIRST, LAST)
        blocks = {k: v for k, v in kwargs.items()
                  if k.startswith("BLOCK_") or k in ("MODE", "DV_PASS", "FIRST", "LAST")}
        compiled.append((self.fn.__name__, kernel, {**blocks, **options}, kwargs.get("HAS_LSS", True)))
        return kernel

    previous_driver = driver._active  # None until Triton first looks for a GPU
    driver.set_active(_StandInDriver(target))
    JITFunction.run = run
    # CPU tensors stand in for CUDA ones (in the CUDA dtypes) of a card of this target
    _common._check_device = lambda t, name: None
    _checks.check_float = lambda t, name, backend: None
    _common._launch_target = lambda device: target
    try:
        yield
    finally:
        JITFunction.run = original_run
        _common._check_device, _checks.check_float = original_checks
        _common._launch_target = original_target
        for fn in touched:  # nothing compiled for the stand-in outlives it
            fn.device_caches.clear()
        driver.set_active(previous_driver)


def _ptxas_name(arch: str = "sm_90") -> str:
    """The ptxas Triton's wheel uses for ``arch``: Triton 3.8 ships a newer one for sm_100 and up."""
    capability = int(re.sub(r"\D", "", arch) or 90)
    if capability >= 100:
        try:
            _triton_tool("ptxas-blackwell")
            return "ptxas-blackwell"
        except FileNotFoundError:
            pass
    return "ptxas"


def toolchain(arch: str = "sm_90") -> str:
    """The Triton in this process and the ptxas its wheel uses for ``arch``, e.g. "triton 3.6.0, ptxas 12.8"."""
    import triton

    if arch.startswith("gfx"):
        return f"triton {triton.__version__}, amdgcn"
    out = subprocess.run([_triton_tool(_ptxas_name(arch)), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+\.\d+)", out)
    return f"triton {triton.__version__}, ptxas {release.group(1) if release else '?'}"


def sass_shape(sass: str) -> dict[str, int]:
    """Static counts of one kernel's SASS (cuobjdump -sass): all instructions, and the main loop's.

    The main loop is the backward branch (a ``BRA`` to a lower address) whose body [target, branch] holds the
    most tensor-core instructions, the shortest such body on a tie: with the pipelined loops Triton and our
    CUDA kernels emit, that is the steady-state step. NOPs (alignment padding) are not counted.
    """
    code = [(int(addr, 16), op, op + rest) for addr, _, op, rest in _SASS_LINE.findall(sass) if op != "NOP"]
    branches = [(int(target, 16), int(addr, 16)) for addr, _, op, rest in _SASS_LINE.findall(sass)
                if op.startswith("BRA") and (target := _branch_target(rest)) is not None
                and int(target, 16) < int(addr, 16)]
    best = (0, 0, 0)  # (tensor-core instructions, -instructions, multiply-adds) of the best loop body
    for lo, hi in branches:
        body = [(op, text) for a, op, text in code if lo <= a <= hi]
        mma = sum(1 for op, _ in body if _TENSOR_CORE.match(op))
        if mma and (mma, -len(body)) > best[:2]:
            best = (mma, -len(body), sum(_mma_macs(text) for _, text in body))
    return {"sass_instructions": len(code), "main_loop_instructions": -best[1], "main_loop_mma": best[0],
            "main_loop_sass_macs": best[2]}


def _mma_macs(op: str) -> int:
    """Multiply-adds of one tensor-core SASS instruction from its shape (HMMA.16816: m16 n8 k16; HMMA.1688;
    HGMMA.64x32x16); 0 for other instructions and for UTC*MMA, whose shape is in its descriptor."""
    if m := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op):
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    if m := re.match(r"HMMA\.(16)(8)(\d+)\b", op):
        return 16 * 8 * int(m.group(3))
    return 0


_CONFIG_NAMES = {"_chunk_attention_fwd_kernel": "forward", "_dq_pass": "dq"}


def config_name(kernel: str, config: dict[str, Any]) -> str | None:
    """The ``dlsn_kernels.targets`` name of a compiled kernel's configuration (``key_dv``, ...), or None."""
    if kernel == "_key_pass":
        return "key_dv" if config.get("DV_PASS") else "key_score"
    return _CONFIG_NAMES.get(kernel)


def step_macs(kernel: str, config: dict[str, Any], cm: int, cv: int) -> int:
    """Multiply-adds of distinct tensor-core work in one step of ``kernel``'s main loop (its dots, channel
    blocks padded to powers of two as the kernels do), 0 for kernels without tensor-core dots."""
    bcm, bcv = (max(16, 1 << (max(c, 1) - 1).bit_length()) for c in (cm, cv))
    q, k = config.get("BLOCK_Q", 0), config.get("BLOCK_K", 0)
    if kernel == "_chunk_attention_fwd_kernel":
        return q * k * (bcm + bcv)  # S = Q K^T, out^T += V^T P^T
    if kernel == "_key_pass":  # S; then dv^T += dO^T P^T, or dP = V dO^T and dkn^T += Q^T dS^T
        return k * q * (bcm + bcv) if config.get("DV_PASS") else k * q * (2 * bcm + bcv)
    if kernel == "_dq_pass":
        return bcm * k * q
    return 0


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


_AMD_MMA = re.compile(r"^\s*(v_mfma\w*|v_wmma\w*|v_smfmac\w*)", re.M)


def amdgcn_usage(asm: str) -> dict[str, Any]:
    """Resource usage and code shape of one AMD kernel from its AMDGCN assembly (Triton's ``asm["amdgcn"]``),
    in the NVIDIA record's field names: registers (VGPRs), spill_bytes ((VGPR + SGPR spills) x 4), stack_bytes
    (scratch), tensor_core_instructions (MFMA/WMMA), and the main loop as for SASS (the backward branch whose
    body holds the most MFMA/WMMA, the shortest on a tie). LDS is the compiled kernel's ``metadata.shared``."""
    def meta(key: str) -> int:
        found = re.findall(rf"\.{key}:\s*(\d+)", asm)
        return int(found[0]) if found else 0

    lines = asm.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.LBB\w+):", line))}
    is_code = [bool(re.match(r"^\s+[a-z_][a-z0-9_]*\b", line)) and not line.strip().startswith(".")
               for line in lines]
    best = (0, 0)
    for i, line in enumerate(lines):
        branch = re.match(r"^\s+s_c?branch\w*\s+(\.LBB\w+)", line)
        if branch and labels.get(branch.group(1), i + 1) < i:
            body = range(labels[branch.group(1)], i + 1)
            mma = sum(1 for j in body if _AMD_MMA.match(lines[j]))
            count = sum(1 for j in body if is_code[j])
            if mma and (mma, -count) > best:
                best = (mma, -count)
    return {
        "registers": meta("vgpr_count"),
        "sgprs": meta("sgpr_count"),
        "spill_bytes": 4 * (meta("vgpr_spill_count") + meta("sgpr_spill_count")),
        "stack_bytes": meta("private_segment_fixed_size"),
        "tensor_core_instructions": len(_AMD_MMA.findall(asm)),
        "ffma_instructions": len(re.findall(r"^\s*v_(?:fma|fmac|pk_fma)_f32(?:_e\d+)?\b", asm, re.M)),
        "sass_instructions": sum(is_code),
        "main_loop_instructions": -best[1],
        "main_loop_mma": best[0],
    }


def _triton_passes_reg_alloc() -> bool:
    import inspect

    from triton.backends.nvidia import compiler

    return "regAllocOptLevel" in inspect.getsource(compiler.CUDABackend.make_cubin)


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
        # the ptxas and register-allocation option Triton's own compile uses (3.8: --regAllocOptLevel=2)
        options = ["--regAllocOptLevel=2"] if _triton_passes_reg_alloc() else []
        ptxas = subprocess.run([_triton_tool(_ptxas_name(arch)), f"-arch={arch}", "-v", *options, ptx_path,
                                "-o", os.devnull], capture_output=True, text=True)
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
        "tcgen05_mma": len(_TCGEN05_MMA.findall(ptx)),
        "ffma_instructions": len(_FFMA.findall(sass)),
        "rs_wgmma": len(_RS_WGMMA.findall(ptx)),
        "mma_duplication": mma_duplication(ttgir),
        "ptxas_warnings": ptxas_warnings(log),
        **sass_shape(sass),
    }


def _problem(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    from dlsn_kernels import n_buckets_for

    n, length, cm, cv, k, rounds = shape
    # the compiler sees dtype, shape and alignment; the values are never read by a kernel, but the host glue
    # reads xm's magnitude (the forward's overflow check), so xm holds zeros rather than torch.empty's garbage
    xm = torch.zeros(n, length, cm, dtype=dtype)
    v = torch.empty(n, length, cv, dtype=dtype)
    lss = torch.empty(n, length, k, dtype=dtype)
    rot = torch.randn(cm, rounds, n_buckets_for(length, k)).to(dtype)
    return xm, v, lss, rot


LEARNED = ("with", "without")  # the learned score (GLA) and the lss-free variants (NLSA: lss=None, HAS_LSS=False)


def _launches(shape: tuple[int, ...], dtype: torch.dtype, learned: tuple[str, ...] = LEARNED) -> None:
    """Every kernel of a training step: gla_attention forward and backward, and chunk_attention, with a learned
    score and/or without one (lss=None)."""
    import dlsn_kernels.triton as tk

    xm, v, learned_score, rot = _problem(shape, dtype)
    k = shape[4]
    for lss in [learned_score] * ("with" in learned) + [None] * ("without" in learned):
        y, lse, perm = tk.gla_attention(xm, v, lss, rot, k)
        perm = torch.arange(shape[1]).expand(shape[0], shape[5], shape[1]).contiguous()  # a valid permutation
        delta = torch.zeros(shape[0], 1, shape[1])
        # compile-only launches leave y and lse unwritten; the backward's host check reads lse's magnitude
        lse = torch.zeros_like(lse)
        tk.attention_backward(y.unsqueeze(1), delta, xm, v, lss, perm, lse.unsqueeze(1), k)
        tk.chunk_attention(xm, v, lss, perm, k)


def compile_kernels(shape: tuple[int, ...] = TRAINING_SHAPE, modes=MODES,
                    kernels: set[str] | None = None, arch: str | int = "90",
                    learned: tuple[str, ...] = LEARNED) -> list[KernelRecord]:
    """Compile every Triton kernel at ``shape`` for each mode (only ``kernels``, if given) for target ``arch``
    (``80`` ... ``120``, ``gfx942``), as a launch on that card would: its capability, and the configuration
    ``dlsn_kernels.targets`` picks for its shared memory; ``learned``: with the learned score, without it (the
    lss-free variants, ``lss`` false in their records) or both. One record per distinct (kernel, variant, mode)."""
    target = target_for_arch(arch)
    records: list[KernelRecord] = []
    tools = toolchain(target.arch)
    for label, dtype, matmul_precision, precision in modes:
        compiled: list[tuple[str, Any, dict[str, Any], bool]] = []
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            with _compile_only(compiled, target, kernels):
                _launches(shape, dtype, learned)
        finally:
            torch.set_float32_matmul_precision(previous)
        seen: set[tuple[str, str, bool]] = set()
        for name, kernel, config, has_lss in compiled:
            key = (name, json.dumps(config, sort_keys=True), has_lss)
            if key in seen:
                continue
            seen.add(key)
            if target.vendor == "amd":
                usage = amdgcn_usage(kernel.asm["amdgcn"])
            else:
                usage = _resource_usage(kernel.asm["cubin"], kernel.asm["ptx"], kernel.asm.get("ttgir", ""))
            records.append(KernelRecord(
                kernel=name, dtype=label, precision=precision, config=config, toolchain=tools,
                shared_bytes=int(kernel.metadata.shared), arch=target.arch, shared_limit=target.shared_per_block,
                step_macs=step_macs(name, config, shape[2], shape[3]), lss=has_lss,
                shared_estimate=_shared_estimate(name, config, dtype, shape[2], shape[3], target), **usage,
            ))
    return records


def _shared_estimate(kernel: str, config: dict[str, Any], dtype: torch.dtype, cm: int, cv: int,
                     target: Target) -> int:
    from dlsn_kernels.targets import shared_estimate

    name = config_name(kernel, config)
    return shared_estimate(name, config, dtype, cm, cv, target) if name else 0


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
            ffma_instructions=len(_FFMA.findall(body)), toolchain="nvcc (dlsn_kernels._C)", arch=arch,
            shared_limit=target_for_arch(arch).shared_per_block, **sass_shape(body),
            # the tensor-core kernels' last template argument is kHasLss (false: the lss-free NLSA variant)
            lss=not ("_tc_" in readable and template is not None
                     and template.group(1).rsplit(",", 1)[-1].strip() == "false"),
        ))
    return records


HOT_KERNELS = ("_chunk_attention_fwd_kernel", "_key_pass", "_dq_pass", "_position_pass", "_combine_rounds_kernel")


def format_table(records: list[KernelRecord]) -> str:
    head = (f"{'arch':<7} {'kernel':<28} {'lss':<3} {'mode':<12} {'config':<44} {'regs':>4} {'spill':>5} {'stack':>5} "
            f"{'smem KB':>7} {'limit':>5} {'TC':>4} {'FFMA':>5} {'SASS':>6} {'loop':>5} {'/MMA':>5} {'/kFLOP':>6} "
            f"{'RS':>3} warnings")
    lines = [head, "-" * len(head)]
    for r in records:
        config = " ".join(f"{k.replace('BLOCK_', '').replace('num_', '')}={v if isinstance(v, str) else int(v)}"
                          for k, v in r.config.items())
        per_mma = f"{r.instructions_per_mma:.1f}" if r.instructions_per_mma is not None else "-"
        per_kflop = f"{r.instructions_per_kflop:.2f}" if r.instructions_per_kflop is not None else "-"
        warnings = ",".join(sorted({w[1:6] if w.startswith("(C") else w[:20] for w in r.ptxas_warnings})) or "-"
        tc = r.tensor_core_instructions or r.tcgen05_mma
        lines.append(
            f"{r.arch:<7} {r.kernel:<28} {'yes' if r.lss else 'no':<3} {r.dtype:<12} {config:<44} {r.registers:>4} "
            f"{r.spill_bytes:>5} "
            f"{r.stack_bytes:>5} {r.shared_bytes / 1024:>7.1f} {r.shared_limit // 1024:>5} {tc:>4} "
            f"{r.ffma_instructions:>5} {r.sass_instructions:>6} {r.main_loop_instructions:>5} {per_mma:>5} "
            f"{per_kflop:>6} {r.rs_wgmma:>3} {warnings}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    parser.add_argument("--shape", nargs=6, type=int, metavar=("N", "L", "Cm", "Cv", "K", "R"),
                        default=list(TRAINING_SHAPE), help="problem shape (default: the training shape)")
    parser.add_argument("--arch", nargs="+", default=["90"], metavar="ARCH",
                        help=f"targets to compile for: NVIDIA capabilities ({' '.join(ARCHS)}) or AMD gfx names "
                             "(gfx942, gfx1100); default 90")
    parser.add_argument("--cuda", action="store_true",
                        help="report the CUDA C++ kernels of the built extension instead (spill = local memory)")
    parser.add_argument("--modes", nargs="+", choices=[m[0] for m in MODES], default=[m[0] for m in MODES],
                        help="dtype/precision modes to compile (default: all)")
    parser.add_argument("--kernels", nargs="+", metavar="NAME",
                        help=f"compile only these Triton kernels ('hot': {', '.join(HOT_KERNELS)})")
    parser.add_argument("--lss", choices=("with", "without", "both"), default="both",
                        help="the kernels with the learned score (GLA), the lss-free variants (lss=None, NLSA) or both "
                             "(default)")
    parser.add_argument("--triton", metavar="DIR",
                        help="compile with the Triton installed in DIR (pip install --target DIR triton==3.6.0), "
                             "in a subprocess with DIR first on PYTHONPATH")
    args = parser.parse_args(argv)
    if args.triton:
        return _rerun_with_triton(args.triton, sys.argv[1:] if argv is None else list(argv))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles real GPU code")
    try:
        targets = [target_for_arch(a) for a in args.arch]
    except ValueError as e:
        parser.error(str(e))
    records: list[KernelRecord] = []
    if args.cuda:
        for target in targets:
            found = cuda_kernels(arch=target.arch)
            if not found:
                print(f"warning: dlsn_kernels._C holds no {target.arch} code", file=sys.stderr)
            records += found
        print(f"CUDA C++ kernels of dlsn_kernels._C, {', '.join(t.arch for t in targets)} code "
              "(spill: local memory bytes; TC: HGMMA/HMMA)")
    else:
        modes = [m for m in MODES if m[0] in args.modes]
        kernels = args.kernels and {k for name in args.kernels for k in (HOT_KERNELS if name == "hot" else [name])}
        for target in targets:
            learned = LEARNED if args.lss == "both" else (args.lss,)
            records += compile_kernels(tuple(args.shape), modes, kernels or None, target.arch, learned)
        print(f"Triton kernels compiled for {', '.join(t.arch for t in targets)} at N, L, Cm, Cv, K, R = "
              f"{tuple(args.shape)} with {', '.join(sorted({r.toolchain for r in records}))} "
              "(TC: tensor-core instructions; SASS: static instructions; loop, /MMA, /kFLOP: main loop's "
              "instructions, per tensor-core instruction and per 1000 FLOPs of tensor-core work per step; "
              "RS: register-A wgmma; limit: shared KB per block)")
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "instructions_per_mma": r.instructions_per_mma,
                        "instructions_per_kflop": r.instructions_per_kflop} for r in records], f, indent=1)
        print(f"wrote {args.json}")
    bad = [r for r in records if not r.ok]
    for r in bad:
        print(f"warning: {r.arch} {r.kernel} ({r.dtype}) spills, uses stack or exceeds shared memory",
              file=sys.stderr)
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
