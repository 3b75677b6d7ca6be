"""Triton backend of dlsn-kernels: plain functions, wrapped into ``dlsn::triton_<name>`` ops by ``_ops``.

Functions (layouts and meaning as in DESIGN.md):

- ``sblsh_hash(xm, rot) -> codes [N, R, L]`` int64
- ``bucket_sort(codes, n_buckets) -> perm [N, R, L]`` int64 (stable)
- ``chunk_attention(xm, v, lss, perm, chunk_size) -> (out [N, R, L, Cv], lse [N, R, L])``
- ``gla_attention(xm, v, lss, rot, chunk_size) -> (y [N, L, Cv], lse [N, L], perm [N, R, L])``
- ``attention_backward(grad_out, delta, xm, v, lss, perm, lse, chunk_size) -> (dxm, dv, dlss)``

``lss`` may be None (NLSA: scores q . k_hat only, the same as zeros): the kernels then compile without the
learned-score loads and sums (``HAS_LSS``), and ``dlss`` is the empty ``xm.new_empty(0)``.

Limits:

- Devices and dtypes: CUDA tensors in float32, float16 or bfloat16. Dot products run on tensor cores for
  float16/bfloat16 and accumulate in float32; softmax and lse are float32. float32 dot products follow
  ``torch.get_float32_matmul_precision()``: IEEE for "highest" (the default), TF32 for "high"/"medium".
  The hash projection is IEEE float32 for every dtype. CPU tensors only under the Triton
  interpreter (``TRITON_INTERPRET=1`` before ``triton`` is first imported), in float32 or float64
  (float64 accumulates in float64, for gradcheck). ``INTERPRETED`` says which mode this process got.
- Sizes: ``Cm`` and ``Cv`` up to ``targets.MAX_CHANNELS`` (512; a channel row is held whole in registers),
  ``chunk_size`` up to ``targets.MAX_CHUNK`` (1024). Any N, L >= 1, any K (L < K included), any R; channel and
  chunk sizes need not be powers of two (blocks are padded to the next power of two and masked).
- ``bucket_sort`` is a Triton counting sort up to ``hash.MAX_SORT_BUCKETS`` (1024) buckets, and
  ``torch.sort(stable=True)`` beyond.
- These bare functions assume ``perm`` is a permutation; the public ops of ``dlsn_kernels`` check it
  before they get here.
- The backward pass needs, per round, float32 slot gradients ``[N, Lp, Cm + Cv + K]`` (``Cm + Cv`` without
  ``lss``) and ``dq`` ``[N, L, Cm]`` (all rounds alive until the position pass sums them), plus one
  ``[N, nc, 3, K, K]`` buffer of ``dS / ||key||`` in the input dtype that each round rewrites.
- Magnitudes: the forward takes any ``max |xm|`` whose scores fit the float range, below about 1e37 in
  float32/bfloat16 (queries scaled by a power of two beyond about 1e18, see ``_common.scaled_key_norms``); the
  backward refuses a saved ``|lse|`` above 2^16 (2^40 in float64), as the cpu backend does.
- Block sizes, warps and stages are fixed per target, precision and problem (``dlsn_kernels.targets``:
  ``triton_config`` picks from per-architecture tables by the device's shared memory per block), no
  autotuning: what ``python -m bench.compile_report --arch ...`` shows spill-free on that target is what runs.
  A case no configuration fits is refused with the reasons of ``targets.triton_unsupported_reasons``.
"""

from ._common import INTERPRETED
from .attention_backward import attention_backward
from .chunk_attention import chunk_attention, gla_attention
from .hash import bucket_sort, sblsh_hash

__all__ = [
    "INTERPRETED",
    "attention_backward",
    "bucket_sort",
    "chunk_attention",
    "gla_attention",
    "sblsh_hash",
]
