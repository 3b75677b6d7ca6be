"""Pieces shared by the Triton kernels: interpreter choice, launch helpers, argument checks.

Interpreter: compiled Triton kernels need a GPU. The Triton interpreter (numpy on the host) runs the
same kernels on CPU tensors, but Triton decides at *its own* import whether its library functions
(``tl.sum``, ``tl.max``, ...) are interpreted: ``TRITON_INTERPRET=1`` must be in the environment before
``triton`` is first imported in the process. ``INTERPRETED`` records what Triton did; our kernels follow
it (even if the variable was removed since), and CPU tensors get a clear error when it is False.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import targets
from .._hash_setup import KEY_NORM_EPS
from .._magnitudes import product_headroom, row_norms
from ..targets import Target

# whether Triton's own library was built for the interpreter (the environment at Triton's import)
INTERPRETED: bool = isinstance(tl.standard.sum, InterpretedFunction)


def jit(fn: Callable) -> Any:
    """``triton.jit``, built for the interpreter when ``INTERPRETED`` (see the module docstring)."""
    if INTERPRETED and not triton.knobs.runtime.interpret:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            return triton.jit(fn)
    return triton.jit(fn)


def device_fn(fn: Callable) -> Any:
    """``triton.jit`` for helpers called from kernels; the plain function under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a jitted helper, which made the
    helpers about a tenth of the interpreted run time; as plain Python they run the same body unpatched.
    """
    return fn if INTERPRETED else triton.jit(fn)


def channel_block(size: int) -> int:
    """Power-of-two block covering ``size``, at least 16 (the smallest ``tl.dot`` operand side)."""
    return max(16, triton.next_power_of_2(max(int(size), 1)))


# The target a launch on a device compiles for (the GPU's properties, read once per device; the interpreter on
# CPU). A module global looked up at every launch, so that ``bench.compile_report`` can stand in a card of any
# architecture.
_launch_target: Callable[[torch.device], Target] = targets.target_of


def kernel_precision(device: torch.device, dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision on ``device`` (``dlsn_kernels.targets.dot_input_precision``: TF32 where the
    policy allows it and the target has it)."""
    return targets.dot_input_precision(_launch_target(device), dtype)


def kernel_config(kernel: str, device: torch.device, dtype: torch.dtype, cm: int, cv: int,
                  chunk_size: int) -> dict[str, int]:
    """The launch options of ``kernel`` on ``device`` (``dlsn_kernels.targets.triton_config``)."""
    return targets.triton_config(kernel, _launch_target(device), dtype, cm, cv, chunk_size)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype) -> Any:
    """The Triton dtype of a floating torch dtype (``tl.dot`` operands use the input dtype)."""
    return _TL_DTYPES[dtype]


# What every attention kernel derives from its arguments: padded channel blocks, accumulation and dot dtypes, and
# whether there is a learned score (lss None, NLSA: the lss-free variant compiles without its loads and gradient).
attention_heuristics = triton.heuristics({
    "BLOCK_CM": lambda a: channel_block(a["Cm"]),
    "BLOCK_CV": lambda a: channel_block(a["Cv"]),
    "HAS_LSS": lambda a: a["lss_ptr"] is not None,
    "ACC": lambda a: tl_dtype(accumulate_dtype(a["xm_ptr"].dtype)),
    "DOT": lambda a: tl_dtype(a["xm_ptr"].dtype),
})


def _check_device(t: torch.Tensor, name: str) -> None:
    """CUDA tensors, or CPU tensors under the interpreter. Shapes, dtypes and the rest are the public ops'
    checks (``dlsn_kernels._checks``), shared by every backend; this is the one rule of Triton's own. Called as
    ``_common._check_device``, a module global, so that ``bench.compile_report`` can let CPU tensors stand in
    for CUDA ones."""
    if t.is_cuda:
        return
    if t.device.type != "cpu":
        raise RuntimeError(f"the Triton backend runs on CUDA tensors, {name} is on {t.device}")
    if not INTERPRETED:
        raise RuntimeError(
            f"{name} is a CPU tensor: the Triton backend runs CPU tensors only under the Triton interpreter "
            "(TRITON_INTERPRET=1 in the environment before triton is first imported); "
            "use backend='cpu' instead"
        )


@device_fn
def first_padded_copy(slot, length, pad):
    """The first padded slot holding the same position as real ``slot`` (< L): ``L + (slot + pad) mod L``;
    the others follow every L below Lp (csrc/slot_layout.h ``first_padded_copy``, DESIGN.md 1.3). With no
    padding it is >= Lp, so a loop over the copies runs zero times."""
    return length + (slot + pad) % length


def slot_rows(perm: torch.Tensor, chunk_size: int, widest: int) -> torch.Tensor:
    """``[N, R, Lp]`` row of ``[N * L, C]`` inputs held by each sorted slot, padded slots included
    (``n * L + perm[n, r, slot]``, DESIGN.md 1.3 and "Triton kernels on Hopper"), once per call: int32 when every
    element offset ``row * C`` (C up to ``widest``) fits, int64 otherwise.
    """
    n, _, length = perm.shape
    pad, padded, _ = slot_layout(length, chunk_size)
    source = torch.arange(padded, device=perm.device)
    source = torch.where(source < length, source, (source - pad) % length)
    base = torch.arange(n, device=perm.device).view(n, 1, 1) * length
    small = n * length * max(int(widest), 1) < 2**31
    return (perm[..., source].long() + base).to(torch.int32 if small else torch.int64).contiguous()


def slot_layout(length: int, chunk_size: int) -> tuple[int, int, int]:
    """``(pad, Lp, nc)`` of a row of L sorted slots cut into chunks of K (DESIGN.md 1.3)."""
    pad = (chunk_size - length % chunk_size) % chunk_size
    return pad, length + pad, (length + pad) // chunk_size


@device_fn
def matmul(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in ``ACC``. float32 operands: "ieee" (FFMA) or "tf32" (tensor cores), from
    :func:`kernel_precision` (the hash passes "ieee" whatever the policy); float16/bfloat16 always run on
    tensor cores and ignore it."""
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)


LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in base 2 in the attention kernels (exp2 is native)
LN2 = tl.constexpr(0.6931471805599453)


def inverse_key_norms(xm: torch.Tensor) -> torch.Tensor:
    """``1 / max(||xm[n, l]||, KEY_NORM_EPS)`` as ``[N, L]`` in the accumulation dtype, once per call: the kernels
    scale each score column by it rather than normalise every gathered key row (each is read by up to 3 query
    chunks per round). Overflow-safe (:func:`dlsn_kernels._magnitudes.row_norms`)."""
    norms, _ = row_norms(xm, accumulate_dtype(xm.dtype))
    return norms.clamp_min(KEY_NORM_EPS).reciprocal().contiguous()


def scaled_key_norms(xm: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inverse norms [N, L], queries, keys)`` for the attention forward, once per call (DESIGN.md "Precision").

    The kernels compute q . key unnormalised (it overflows float32 at xm * 1e30) and scale the score column by
    ``factor / max(||key||, eps)``. So the queries are ``xm * 2^-e`` (exact) with 2^e folded into the inverse norms,
    e the smallest power that keeps ``Cm max|xm|^2 2^-e`` at a quarter of the accumulation range: 0 below about 1e18
    in float32, where queries and keys are ``xm`` itself, bit for bit. A key row whose inverse norm would then
    overflow (far below the largest) is read as ``key 2^c`` with ``2^(e - c)`` in its inverse norm. The copies are
    made here, not by a multiply in the kernel: a query tile scaled in registers becomes a register-A wgmma operand
    (Triton issue #9433). Refused: max |xm| whose scores (``sqrt(Cm) max|xm|`` times ``factor``) could overflow.
    """
    acc = accumulate_dtype(xm.dtype)
    norms, top_exp = row_norms(xm, acc)
    cm = int(xm.shape[-1])
    top_range = math.frexp(torch.finfo(acc).max)[1]  # finfo.max < 2^top_range
    bound = math.frexp(torch.finfo(acc).max / (2 * max(factor, 1.0) * math.sqrt(max(cm, 1))))[1] - 1
    top = int(top_exp)  # the one host read: the only way to refuse rather than return NaN
    if top > bound:
        raise ValueError(
            f"xm reaches {float(xm.detach().abs().amax()):.3g} in magnitude; the attention kernels resolve scores "
            f"only while max |xm| < {2.0 ** bound:.3g} ({xm.dtype}, Cm = {cm}): scale xm down, its norm sets the scores"
        )
    inv = norms.clamp_min(KEY_NORM_EPS).reciprocal()
    shift = max(0, 2 * top - product_headroom(acc, cm))
    if shift == 0:
        return (inv * factor).contiguous(), xm.contiguous(), xm.contiguous()
    # per key row c >= 0 keeps 2^(e - c) factor inv below half the range (factor < 2, inv < 2^exponent)
    up = (shift + torch.frexp(inv).exponent + 2 - top_range).clamp_min(0)
    inv = torch.ldexp(inv, shift - up) * factor
    queries = torch.ldexp(xm.to(acc), torch.tensor(float(-shift), device=xm.device))
    keys = torch.ldexp(xm.to(acc), up.unsqueeze(-1).to(acc))
    return inv.contiguous(), queries.to(xm.dtype).contiguous(), keys.to(xm.dtype).contiguous()
