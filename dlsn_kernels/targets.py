"""GPU targets: what a device is, which Triton kernel configuration it gets, and which backend it prefers.

Pure Python over torch (no Triton import), so the dispatcher and the compile report can both ask it.
The one place that decides, per target (compute capability or AMD gfx name, shared memory per block,
warp size), precision and problem size (Cm, Cv, K):

- the tiles, warps and stages every Triton kernel launches with (:func:`triton_config`);
- whether the Triton backend can run a case on that target at all (:func:`triton_unsupported_reasons`);
- the static automatic order of the GPU backends there (:func:`static_gpu_order`), read from the offline
  compile report until a GPU run says otherwise.

Nothing here touches the file system or the environment per call: device properties are read once per
device and cached, so the dispatch that calls this stays traceable by ``torch.compile``.

Configurations are tables per tensor-core family (``mma``: mma.sync on sm_80/86/89/120; ``wgmma``: sm_90;
``tcgen05``: sm_100; AMD ``mfma``/``wmma``) and dot kind (``native`` bf16/fp16, ``tf32``, ``ieee``), each a
list of candidates from the largest down. The first candidate whose shared memory (:func:`shared_estimate`,
an upper bound checked against every compiled kernel by ``tests/test_compile_report.py``) fits the target's
per-block limit is the one launched; when none fits, the case is unsupported and says why. Every table row
is what ``python -m bench.compile_report --arch ...`` shows clean on that target (bench/results).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_CHANNELS",
    "MAX_CHUNK",
    "TRITON_KERNELS",
    "Target",
    "dot_input_precision",
    "dot_kind_of",
    "family_of",
    "precision_of",
    "shared_estimate",
    "static_gpu_order",
    "target_for_arch",
    "target_of",
    "triton_config",
    "triton_unsupported_reasons",
]

# Channel rows (Cm, Cv) live whole in registers (padded to a power of two): past this they would spill.
MAX_CHANNELS = 512
# A chunk row of learned scores (K values) is loaded whole by the backward position pass.
MAX_CHUNK = 1024

# The Triton kernels with a launch configuration, by the names triton_config takes.
TRITON_KERNELS = ("forward", "key_dv", "key_score", "dq", "position", "combine")


@dataclass(frozen=True)
class Target:
    """One compile/launch target.

    ``arch``: ``"sm_86"``, ``"gfx942"``, or ``"interpreter"`` (Triton on CPU tensors); ``vendor``:
    ``"nvidia"``, ``"amd"`` or ``"interpreter"``; ``capability``: ``(major, minor)`` on NVIDIA, else None;
    ``shared_per_block``: the most shared memory (LDS) one block may use, in bytes (the opt-in maximum);
    ``warp_size``: 32, or 64 on CDNA.
    """

    arch: str
    vendor: str
    capability: tuple[int, int] | None
    shared_per_block: int
    warp_size: int


# Shared memory per block (opt-in maximum) by NVIDIA capability, from the CUDA programming guide's table.
_NVIDIA_SHARED = {
    (8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
    (9, 0): 227 * 1024, (10, 0): 227 * 1024, (10, 3): 227 * 1024, (12, 0): 99 * 1024,
}
_AMD = {"gfx942": (64 * 1024, 64), "gfx90a": (64 * 1024, 64), "gfx1100": (64 * 1024, 32)}
# The interpreter runs the tiles of sm_90 (the tables the interpreter tests have always exercised).
INTERPRETER = Target("interpreter", "interpreter", None, 1 << 30, 32)


def target_for_arch(arch: str | int) -> Target:
    """The target of an architecture name as the compile report takes it: ``80``, ``"sm_86"``, ``"gfx942"``."""
    name = str(arch).lower().removeprefix("sm_")
    if name.startswith("gfx"):
        if name not in _AMD:
            raise ValueError(f"unknown AMD target {arch!r}; known: {', '.join(sorted(_AMD))}")
        shared, warp = _AMD[name]
        return Target(name, "amd", None, shared, warp)
    if not name.isdigit() or len(name) < 2:
        raise ValueError(f"unknown architecture {arch!r}; give a capability such as 80, 86, 90, 120 or a gfx name")
    capability = (int(name[:-1]), int(name[-1]))
    shared = _NVIDIA_SHARED.get(capability, 99 * 1024)
    return Target(f"sm_{name}", "nvidia", capability, shared, 32)


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    shared = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    if getattr(torch.version, "hip", None):
        arch = str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
        warp = int(getattr(props, "warp_size", 64) or 64)
        return Target(arch, "amd", None, shared or 64 * 1024, warp)
    capability = (props.major, props.minor)
    return Target(f"sm_{props.major}{props.minor}", "nvidia", capability,
                  shared or _NVIDIA_SHARED.get(capability, 99 * 1024), 32)


def target_of(device: torch.device) -> Target:
    """The target of ``device``: its GPU's properties (read once per device), or the interpreter on CPU."""
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_target(index)


def precision_of(dtype: torch.dtype) -> str:
    """``bf16``, ``fp16``, ``fp64``, ``tf32`` or ``ieee`` (float32 by ``torch.get_float32_matmul_precision()``)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float64:
        return "fp64"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_kind_of(dtype: torch.dtype, target: Target | None = None) -> str:
    """How the attention dots of ``dtype`` run on ``target``: ``native`` (float16/bfloat16 tensor cores), ``tf32``
    or ``ieee`` (float32 under "highest", float64; and float32 on RDNA, whose Triton backend has no TF32)."""
    precision = precision_of(dtype)
    if precision == "tf32" and target is not None and family_of(target) == "wmma":
        return "ieee"
    return {"bf16": "native", "fp16": "native", "fp64": "ieee"}.get(precision, precision)


def dot_input_precision(target: Target, dtype: torch.dtype) -> str:
    """The ``tl.dot`` ``input_precision`` of the attention kernels on ``target``: ``"tf32"`` for float32 under
    "high"/"medium" (where the target has it), else ``"ieee"`` (float16/bfloat16 run on tensor cores either way)."""
    return "tf32" if dot_kind_of(dtype, target) == "tf32" else "ieee"


def family_of(target: Target) -> str:
    """The tensor-core family whose tile tables a target uses: ``wgmma`` (sm_90, and the interpreter),
    ``tcgen05`` (sm_100/103/110), ``mma`` (mma.sync: sm_80/86/87/89 and sm_120/121), ``mfma`` (CDNA, wavefront
    64) or ``wmma`` (RDNA, wavefront 32)."""
    if target.vendor == "interpreter":
        return "wgmma"
    if target.vendor == "amd":
        return "mfma" if target.warp_size == 64 else "wmma"
    major = target.capability[0]
    if major == 9:
        return "wgmma"
    if major in (10, 11):
        return "tcgen05"
    return "mma"


# ---- tile tables ---------------------------------------------------------------------------------------------
# Rows are candidates from the largest down; the first whose shared memory fits the target is launched.
# forward / dq: (BLOCK_Q, BLOCK_K, num_warps, num_stages); key_dv / key_score: (BLOCK_K, BLOCK_Q, num_warps,
# num_stages). All are sized for the training shape (Cm = 64, Cv = 256, K = 128); narrower value rows (Cv <= 128)
# run 4 warps (not float32 on RDNA), and no block exceeds the (padded) chunk.
#
# wgmma (sm_90): what the compile report shows spill-free, stack-free, without C7515 and without register-A
# wgmma under Triton 3.6 and 3.8. With chained dots Triton lays the warps along M, 16 rows each: 4 warps (one
# warpgroup) at 64 query slots compute every S once. TF32 needs the [Cv, 64] accumulator split over two
# warpgroups to fit in registers. IEEE float32 runs on FFMA, which holds whole operand rows in registers, hence
# its small key tiles. The backward key passes run 4 warps (the M of dkn^T and dq^T is Cm = 64, one warpgroup);
# the dq pass takes a deep key step (8 HGMMA per step) to keep the loop's instructions per MMA low.
_WGMMA = {
    "forward": {"native": [(64, 32, 4, 2)], "tf32": [(64, 32, 8, 2)], "ieee": [(32, 16, 4, 2)]},
    "key_dv": {"native": [(64, 64, 4, 2)], "tf32": [(64, 32, 4, 2)], "ieee": [(64, 16, 8, 2)]},
    "key_score": {"native": [(64, 32, 4, 2)], "tf32": [(64, 16, 4, 2)], "ieee": [(64, 16, 8, 2)]},
    "dq": {"native": [(64, 128, 4, 2)], "tf32": [(64, 64, 4, 2)], "ieee": [(32, 32, 4, 2)]},
}
# mma (mma.sync: sm_80/86/89/120): the accumulators live in registers whatever the instruction, so the wide
# ones are split over 8 warps (Hopper's 4-warp tiles spill here: the dv pass with 64 keys got 32 registers and
# 16 KB of spills on sm_80). Two rows where sm_80's 163 KB admit a larger tile than the 99 KB of sm_86/89/120.
_MMA = {
    "forward": {"native": [(64, 32, 8, 2)], "tf32": [(64, 32, 8, 2), (64, 16, 8, 2)], "ieee": [(32, 16, 4, 2)]},
    "key_dv": {"native": [(64, 64, 8, 2), (64, 32, 8, 2)], "tf32": [(64, 32, 8, 2), (64, 16, 4, 2)],
               "ieee": [(64, 16, 8, 2), (32, 16, 4, 2)]},
    "key_score": {"native": [(64, 32, 8, 2)], "tf32": [(64, 16, 8, 2), (32, 16, 4, 2)],
                  "ieee": [(64, 16, 8, 2), (32, 16, 4, 2)]},
    "dq": {"native": [(64, 128, 4, 2)], "tf32": [(64, 64, 4, 2)], "ieee": [(32, 32, 4, 2)]},
}
# tcgen05 (sm_100): Hopper's tiles, but the forward's [Cv, 64] accumulator comes out of tensor memory into
# registers for every rescale, which spilled with 4 warps; 8 warps and 64-key steps are clean.
_TCGEN05 = {**_WGMMA, "forward": {**_WGMMA["forward"], "native": [(64, 64, 8, 2)]}}
# AMD (mfma: CDNA gfx90a/gfx942, wavefront 64; wmma: RDNA3 gfx1100, wavefront 32): 64 KB of LDS per workgroup,
# so 32-row tiles (the float32 epilogue of a 64-row [Cv, Q] accumulator alone is 64 KB). num_warps counts
# wavefronts. CDNA's dots use 16x16 MFMA (matrix_instr_nonkdim = 16, Triton's AMD option; 32x32 would waste half
# of a 32-row tile); waves_per_eu is left to the compiler (not measured on hardware).
_AMD_TILES = {
    "forward": {"native": [(32, 32, 4, 2)], "tf32": [(32, 16, 4, 2)], "ieee": [(32, 16, 4, 2)]},
    "key_dv": {"native": [(32, 32, 4, 2)], "tf32": [(32, 16, 4, 2)], "ieee": [(32, 16, 4, 2)]},
    "key_score": {"native": [(32, 16, 4, 2)], "tf32": [(16, 16, 4, 2)], "ieee": [(16, 16, 4, 2)]},
    "dq": {"native": [(64, 64, 4, 2)], "tf32": [(32, 32, 4, 2)], "ieee": [(32, 32, 4, 2)]},
}
# RDNA (wavefront 32; RDNA3 gfx1100): a wave addresses at most 256 VGPRs, and a WMMA operand is replicated across
# the two halves of the wave (a 16x16 bf16 tile takes 8 VGPRs per lane), so operands cost twice CDNA's registers.
# Every pass is unpipelined (num_stages 1): with 2 stages the AMD stream pipeliner holds the next step's rows in
# registers on their way to LDS, which spilled the forward (40-76 B bf16, 1020 B float32) and the float32 dv pass
# (336 B). Unpipelined, the bf16 forward keeps 40 VGPRs to spare (a 64-key step spilled with the learned scores),
# and the dv pass takes 64 query slots per step (0.42 main-loop instructions per kFLOP against 0.71 pipelined).
# Float32 (IEEE: RDNA's Triton has no TF32) runs on FMA, which holds whole operand rows per thread: 16 wavefronts
# spread them. The score pass's dP = V dO^T is Cv = 256 deep: holding V [keys, Cv] over the loop as a replicated
# WMMA operand (128 VGPRs for 16 keys, before dO's 128) spilled it (bf16 376 B, float32 728 B), so on RDNA it sums
# dP over 32-channel chunks of V and dO read per step (_RDNA_CV_CHUNK, the kernel's BLOCK_CV_CHUNK); with V no
# longer held, bf16 takes 32 query slots per step.
# The "tf32" rows are never chosen on RDNA (dot_kind_of); they repeat the IEEE rows.
_RDNA = {
    "forward": {"native": [(32, 32, 8, 1)], "tf32": [(32, 16, 16, 1)], "ieee": [(32, 16, 16, 1)]},
    "key_dv": {"native": [(32, 64, 8, 1)], "tf32": [(32, 16, 16, 1)], "ieee": [(32, 16, 16, 1)]},
    "key_score": {"native": [(32, 32, 4, 1)], "tf32": [(16, 16, 8, 1)], "ieee": [(16, 16, 8, 1)]},
    "dq": {"native": [(64, 64, 4, 1)], "tf32": [(64, 32, 8, 1)], "ieee": [(64, 32, 8, 1)]},
}
_TABLES = {"wgmma": _WGMMA, "tcgen05": _TCGEN05, "mma": _MMA, "mfma": _AMD_TILES, "wmma": _RDNA}
_AMD_OPTIONS = {"mfma": {"matrix_instr_nonkdim": 16}, "wmma": {}}
# value channels per dP chunk of the score pass (BLOCK_CV_CHUNK) where V is not held over the loop; other targets
# hold V (no BLOCK_CV_CHUNK in their configurations: the kernel's default 0)
_RDNA_CV_CHUNK = 32

_SMALLEST = (16, 16, 4, 1)

_FIELDS = {
    "forward": ("BLOCK_Q", "BLOCK_K", "num_warps", "num_stages"),
    "dq": ("BLOCK_Q", "BLOCK_K", "num_warps", "num_stages"),
    "key_dv": ("BLOCK_K", "BLOCK_Q", "num_warps", "num_stages"),
    "key_score": ("BLOCK_K", "BLOCK_Q", "num_warps", "num_stages"),
}


def _pow2(size: int) -> int:
    """The power-of-two block covering ``size``, at least 16 (the smallest ``tl.dot`` operand side)."""
    size = max(int(size), 1)
    return max(16, 1 << (size - 1).bit_length())


def shared_estimate(kernel: str, config: dict[str, int], dtype: torch.dtype, cm: int, cv: int,
                    target: Target | None = None) -> int:
    """An upper bound of the shared memory (bytes) one block of ``kernel`` uses with ``config``.

    Triton reuses shared memory between phases, so a block needs the larger of its main loop (``num_stages``
    buffers of the rows streamed per step, one of the tiles held over the loop, the P/dS tile) and its epilogue
    (the float32 accumulator, whose layout conversion for the store can take it whole), plus 1 KB of barriers.
    On wgmma/tcgen05 targets (and when ``target`` is None) the P/dS tiles also pass through shared memory as a
    float32 copy (they are a dot's shared-memory operand there; mma.sync keeps them in registers).
    Checked against every kernel the compile report compiles (``tests/test_compile_report.py``): it must never be
    below what Triton allocates. Operands are in the input dtype (2 bytes bfloat16/float16, 4 float32, 8 float64).
    """
    if kernel in ("position", "combine"):
        return 0
    e = dtype.itemsize  # the dot operands stay in the input dtype
    bcm, bcv = _pow2(cm), _pow2(cv)
    q, k, stages = config.get("BLOCK_Q", 0), config.get("BLOCK_K", 0), config.get("num_stages", 2)
    # (AMD options such as matrix_instr_nonkdim do not change the tiles' bytes)
    tile = q * k * 4 * (2 if target is None or family_of(target) in ("wgmma", "tcgen05") else 1)
    if kernel == "forward":  # per step: key and value rows; held: the queries; P; epilogue: out^T
        loop, epilogue = stages * k * (bcm + bcv) * e + q * bcm * e + tile, bcv * q * 4
    elif kernel == "key_dv":  # per step: query and dO rows; held: keys; P; epilogue: dv^T
        loop, epilogue = stages * q * (bcm + bcv) * e + k * bcm * e + tile, bcv * k * 4
    elif kernel == "key_score":  # per step: query and dO rows; held: keys and values; dS and dlss; epilogue: dkn^T
        # (BLOCK_CV_CHUNK: the values are read per step in chunks, not held: at most their stages' buffers)
        values = k * bcv * e * (stages if config.get("BLOCK_CV_CHUNK", 0) else 1)
        loop, epilogue = stages * q * (bcm + bcv) * e + k * bcm * e + values + 2 * tile, bcm * k * 4
    elif kernel == "dq":  # per step: key rows and the dS tile; epilogue: dq^T
        loop, epilogue = stages * k * (bcm + q) * e + q * bcm * 4, bcm * q * 4
    else:
        raise ValueError(f"unknown Triton kernel {kernel!r}; known: {', '.join(TRITON_KERNELS)}")
    return max(loop, epilogue) + 1024


def _candidates(kernel: str, target: Target, dtype: torch.dtype, cv: int, chunk_size: int) -> list[dict[str, int]]:
    if kernel == "combine":
        return [{"BLOCK_P": max(1, min(32, 8192 // _pow2(cv))), "num_warps": 4}]
    if kernel == "position":
        # 16 positions per program on every target: 32 spilled 10-20 scalar registers on AMD (gfx942, gfx1100) and,
        # under Triton 3.6 (ptxas 12.8), 8 B of the lss-free pass on sm_90 (bf16/fp16: 128 registers); 16 are clean
        return [{"BLOCK_P": 16, "num_warps": 8}]
    # the last resort of every table: the smallest tiles tl.dot takes, unpipelined (wide channels on 99 KB cards)
    rows = [*_TABLES[family_of(target)][kernel][dot_kind_of(dtype, target)], _SMALLEST]
    chunk = _pow2(chunk_size)
    # narrower value rows take 4 warps, except float32 on RDNA: its FMA dots hold whole operand rows per thread,
    # and 4 wavefronts spilled there at Cv = 128 (forward 396 B, dv pass 276 B) where the rows' own are clean
    narrow = _pow2(cv) <= 128 and not (family_of(target) == "wmma" and dot_kind_of(dtype, target) == "ieee")
    out = []
    for row in rows:
        config = dict(zip(_FIELDS[kernel], row))
        config["BLOCK_Q"] = min(config["BLOCK_Q"], chunk)
        config["BLOCK_K"] = min(config["BLOCK_K"], chunk)
        if narrow and kernel != "dq":
            config["num_warps"] = 4
        config |= _AMD_OPTIONS.get(family_of(target), {})
        if kernel == "key_score" and family_of(target) == "wmma" and _pow2(cv) > _RDNA_CV_CHUNK:
            config["BLOCK_CV_CHUNK"] = _RDNA_CV_CHUNK
        if config not in out:
            out.append(config)
    return out


def _fits(kernel: str, config: dict[str, int], target: Target, dtype: torch.dtype, cm: int, cv: int) -> bool:
    return shared_estimate(kernel, config, dtype, cm, cv, target) <= target.shared_per_block


def triton_config(kernel: str, target: Target, dtype: torch.dtype, cm: int, cv: int,
                  chunk_size: int) -> dict[str, int]:
    """The launch options (``BLOCK_*``, ``num_warps``, ``num_stages``) of Triton kernel ``kernel`` (one of
    ``TRITON_KERNELS``) on ``target`` for inputs of ``dtype`` with Cm, Cv channels and chunks of ``chunk_size``.

    The first candidate of the target's table whose shared memory fits; ``ValueError`` (with the reasons of
    :func:`triton_unsupported_reasons`) when none does: a configuration that does not fit is never launched.
    """
    candidates = _candidates(kernel, target, dtype, cv, chunk_size)
    for config in candidates:
        if _fits(kernel, config, target, dtype, cm, cv):
            return config
    reasons = triton_unsupported_reasons(target, dtype, cm, cv, chunk_size)
    raise ValueError("; ".join(reasons) or f"no {kernel} configuration fits {target.arch}")


def triton_unsupported_reasons(target: Target, dtype: torch.dtype, cm: int, cv: int, chunk_size: int) -> list[str]:
    """Why the Triton backend cannot run this case on ``target`` (empty: it can), one line per reason."""
    reasons = []
    for name, size in (("Cm", cm), ("Cv", cv)):
        if size > MAX_CHANNELS:
            reasons.append(f"{name} = {size} channels is above the Triton backend's limit of {MAX_CHANNELS}")
    if chunk_size > MAX_CHUNK:
        reasons.append(f"chunk_size {chunk_size} is above the Triton backend's limit of {MAX_CHUNK}")
    if reasons:
        return reasons
    if target.vendor == "nvidia" and target.capability < (8, 0) and dot_kind_of(dtype) != "ieee":
        return [f"Triton's tensor-core kernels need sm_80 or newer, {target.arch} has none for {dtype}"]
    for kernel in TRITON_KERNELS:
        candidates = _candidates(kernel, target, dtype, cv, chunk_size)
        if not any(_fits(kernel, c, target, dtype, cm, cv) for c in candidates):
            need = min(shared_estimate(kernel, c, dtype, cm, cv, target) for c in candidates)
            reasons.append(f"the {precision_of(dtype).upper()} {kernel} pass needs {need / 1024:.0f} KB of shared "
                           f"memory, {target.arch} allows {target.shared_per_block / 1024:.0f} KB")
    return reasons


# The targets whose Triton kernels the offline compile report (bench/results/compile_report.md: Triton 3.8.0,
# training shape, bf16/fp16/TF32/IEEE) shows clean in every hot kernel: no spills, no stack, shared memory within
# the per-block limit, tensor-core instructions where the precision has them. None has been measured on hardware.
CLEAN_OFFLINE = frozenset({"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"})
# (arch, precision) cases of those targets where a hot kernel is not clean, with why: cuda goes first there.
NOT_CLEAN: dict[tuple[str, str], str] = {}
# AMD targets checked offline (Triton 3.8's AMD backend) and what is not clean there (no cuda backend to prefer)
AMD_OFFLINE = {
    "gfx942": "clean offline (bf16, TF32 and IEEE: no VGPR/SGPR spills, LDS within 64 KB, MFMA)",
    "gfx1100": ("clean offline (bf16/fp16 and float32, IEEE on FMA there: no VGPR/SGPR spills, LDS within 64 KB, "
                "WMMA in bf16/fp16; the score pass sums dP over 32-channel chunks of V)"),
}


def static_gpu_order(target: Target, dtype: torch.dtype) -> tuple[tuple[str, ...], str]:
    """The automatic order of backends on CUDA-type tensors of ``target``, and why (for ``available_backends``).

    Triton first where the offline compile report shows its kernels clean on that target and precision; cuda
    first where it does not (or the target was never compiled for), and on targets older than sm_80. Measures
    nothing: a GPU run that measured the card (``dlsn_kernels._backend_choice``) takes precedence over this.
    """
    precision = precision_of(dtype)
    if target.vendor == "interpreter":
        return ("triton",), "the Triton interpreter runs on CPU tensors"
    if target.vendor == "amd":
        state = AMD_OFFLINE.get(target.arch, "not in the offline compile report")
        return ("triton",), (f"{target.arch} (AMD): the triton backend only (the cuda kernels need an NVIDIA "
                             f"build); {state}; not measured on hardware")
    if target.capability < (8, 0):
        return ("cuda", "triton"), (f"{target.arch} is older than sm_80: the Triton kernels are neither compiled "
                                    "nor checked for it")
    if (target.arch, precision) in NOT_CLEAN:
        return ("cuda", "triton"), (f"static order: triton's {precision} kernels are not clean on {target.arch} "
                                    f"in the offline compile report ({NOT_CLEAN[target.arch, precision]})")
    if target.arch not in CLEAN_OFFLINE:
        return ("cuda", "triton"), (f"static order: {target.arch} is not in the offline compile report "
                                    f"(checked: {', '.join(sorted(CLEAN_OFFLINE, key=_arch_key))})")
    return ("triton", "cuda"), (f"static order: triton's {precision} kernels are clean on {target.arch} in the "
                                "offline compile report (no spills, no stack, shared memory within the limit, "
                                "tensor cores); not measured on hardware")


def _arch_key(arch: str) -> int:
    return int(arch.removeprefix("sm_"))
