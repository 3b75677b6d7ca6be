"""The networks rewritten for ONNX export: GLA in standard ONNX operators, images in [0, 1].

``python -m dlsn.export`` (``dlsn/export.py``) builds its graph from the pieces here. Nothing in
``dlsn.models`` changes: :func:`export_network` deep-copies a loaded network and swaps every
:class:`~dlsn.models.gla.GLA` block for an :class:`ExportGLA` (every :class:`~dlsn.models.nlsn.NLSA` block for an
:class:`ExportNLSA`), which shares the block's layers and hands the attention (hash, sort, chunked attention,
round merge) to one custom op, ``dlsn_onnx::gla_attention`` (NLSA: spherical rotations ``cat[R, -R]`` in the
bank, no learned score).
``torch.export`` traces that op as a single node (tracing the attention's size arithmetic symbolically took
minutes per block), and the ONNX exporter replaces the node by :func:`gla_attention_onnx`, which writes the
attention in default-domain ONNX operators (DESIGN.md "Semantics" 1.1-1.5):

- **Rotations** cannot be drawn inside a graph (no QR, and PyTorch's generator is not ONNX's). Each block's
  rotations are drawn at export time by the block itself (:meth:`GLA.rotations`, in eval mode with its
  inference seed: the call its PyTorch forward makes), once for every bucket count a size can need
  (1, 2, 4, ..., 128), and stored as one constant ``bank [Cm, R, 4161]``: the ``[Cm, R, B]`` slices one after
  another, B ascending. The graph computes B from ``H * W`` (DESIGN.md "Bucket count"), the slice's start from
  B (:func:`bank_offset`), and slices (``Slice``). Concatenated slices hold 4161 columns where a padded
  ``[65, Cm, R, 128]`` bank would hold 8320 and need a mask so that padded columns never win the argmax.
- **Codes**: ``ArgMax`` over B of ``xm @ rot`` (float32, as every backend hashes); ONNX ArgMax keeps the first
  maximum (``select_last_index=0``), the lowest b, as DESIGN.md 1.1 asks.
- **Stable sort**: ``TopK(code * L + position, k=L, axis=-1, largest=0, sorted=1)`` on int64. Positions are
  distinct, so the keys of one (image, round) are distinct: TopK's unspecified order among equal keys never
  comes into play, and the order is (code, position), the stable order of DESIGN.md 1.2. The keys are below
  ``128 L`` and fit int64 for any image (float32 keys would be exact only up to 2^24 / 128 = 131072 positions).
- **Attention**: the materialising formulation, one round after another (R is fixed at export, so the rounds
  are unrolled and ONNX Runtime can free a round's tensors before the next): gather the sorted rows
  (``Gather`` of whole rows of ``[N L, C]``, padded slots included, DESIGN.md 1.3), chunk, three score blocks
  per query chunk against chunks c, c - 1, c + 1 (``Slice`` + ``Concat`` rolls, which keep the duplicates at
  nc = 1 and 2), the learned score added, softmax and lse over the 3K keys, three ``MatMul`` with the values,
  back to position order through the inverse permutation (``ScatterElements`` of positions, then ``Gather``),
  rounds merged by a running softmax over their lse (DESIGN.md "Forward"). No ``[N, nc, 3K, Cv]`` copy of the
  values is made: the three value blocks are multiplied separately.
- **The tail** runs on the whole image (the bands of ``dlsn.models.tail`` are a Python loop over a size): the
  export traces the network with autograd enabled, where ``run_tail`` and ``scaled_residual`` take their plain
  whole-image forms (no parameter needs a gradient).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from onnx import TensorProto, helper
from onnxscript import opset18 as op
from torch import Tensor, nn

from dlsn.errors import UserInputError
from dlsn.models.gla import GLA
from dlsn.models.nlsn import NLSA
from dlsn_kernels import spherical_rotations
from dlsn_kernels._hash_setup import KEY_NORM_EPS, MAX_BUCKETS, n_buckets_for

__all__ = [
    "BUCKET_COUNTS",
    "ExportGLA",
    "ExportNLSA",
    "ImageNetwork",
    "bank_offset",
    "export_network",
    "gla_attention_onnx",
    "gla_attention_op",
    "rotation_bank",
]

# Every bucket count DESIGN.md's rule can give: 1 (fewer positions than one chunk) and the even counts to the cap.
BUCKET_COUNTS: tuple[int, ...] = (1, *range(2, MAX_BUCKETS + 1, 2))

OP_NAMESPACE = "dlsn_onnx"
_INT64_MAX = 2**63 - 1  # Slice's "to the end"
_ZERO_I64 = helper.make_tensor("zero", TensorProto.INT64, [1], [0])  # ConstantOfShape's fill value


def bank_offset(n_buckets: Any) -> Any:
    """First column of the ``[Cm, R, n_buckets]`` slice in the bank (ints or SymInts): columns
    ``[B=1 | B=2 | B=4 | ... | B=128]``, so an even B starts at ``1 + 2 + 4 + ... + (B - 2) = 1 + h (h - 1)``
    with ``h = B / 2``, and B = 1 at 0."""
    half = n_buckets // 2
    return half * half - half + torch.sym_min(n_buckets - 1, 1)


def _length_for(n_buckets: int, chunk_size: int) -> int | None:
    """A sequence length whose bucket count is ``n_buckets``, or None when none has it (B = 1 needs L < K)."""
    length = 1 if n_buckets == 1 else n_buckets * chunk_size
    return length if n_buckets_for(length, chunk_size) == n_buckets else None


def _block_rotation(block: nn.Module, length: int) -> Tensor:
    """The ``[Cm, R, B]`` SB-LSH rotation ``block``'s eval forward passes to the attention for ``length``."""
    rot = block.rotations(length, torch.device("cpu")).detach().to(torch.float32)
    if isinstance(block, NLSA):  # Gaussian halves -> cat[R, -R] (zeros at B = 1), as NLSA.attend builds it
        rot = spherical_rotations(rot)
    return rot


def rotation_bank(block: nn.Module) -> Tensor:
    """``[Cm, R, sum(BUCKET_COUNTS)]`` float32 on the CPU: the rotations a GLA or NLSA ``block`` uses in eval mode
    for each bucket count, drawn through ``block.rotations`` as its forward does (see the module docstring).

    Raises :class:`UserInputError` when the block draws different rotations on two calls (no inference seed:
    a graph cannot hold rotations that change on every call).
    """
    if block.training:
        raise ValueError("rotation_bank needs the block in eval mode (the rotations inference uses)")
    cm = block.channels // block.reduction
    rounds = block.rounds()
    slices = []
    for n_buckets in BUCKET_COUNTS:
        length = _length_for(n_buckets, block.chunk_size)
        if length is None:
            # Unreachable bucket count (B = 1 with K = 1): its argmax over one column is 0 whatever it holds.
            slices.append(torch.zeros(cm, rounds, n_buckets))
            continue
        rot = _block_rotation(block, length)
        if tuple(rot.shape) != (cm, rounds, n_buckets):
            raise RuntimeError(f"{type(block).__name__} rotations have shape {tuple(rot.shape)} for L={length}, "
                               f"expected {(cm, rounds, n_buckets)}")
        if n_buckets == 2 and not torch.equal(rot, _block_rotation(block, length)):
            raise UserInputError("the attention blocks draw new rotations on every call (no inference seed), "
                                 "so no graph can reproduce them; give a seed")
        slices.append(rot)
    return torch.cat(slices, dim=-1).contiguous()


@torch.library.custom_op(f"{OP_NAMESPACE}::gla_attention", mutates_args=())
def gla_attention_op(xm: Tensor, v: Tensor, lss: Tensor | None, bank: Tensor, chunk_size: int, rounds: int) -> Tensor:
    """GLA's attention with the rotations of the bank's slice for this length: ``y [N, L, Cv]`` (float32);
    ``lss`` None: no learned score (NLSA).

    A custom op so that ``torch.export`` traces it as one node (the attention's symbolic size arithmetic
    otherwise takes minutes to trace per block); the ONNX export replaces the node by :func:`gla_attention_onnx`.
    Eagerly it is the project's reference op, for tests and for running the export module in PyTorch.
    """
    from dlsn_kernels import gla_attention

    n_buckets = n_buckets_for(xm.shape[1], chunk_size)
    rot = bank.narrow(-1, bank_offset(n_buckets), n_buckets)
    if rot.shape[1] != rounds:
        raise ValueError(f"bank holds {rot.shape[1]} rounds, the op was given {rounds}")
    return gla_attention(xm, v, lss, rot.to(xm.dtype), chunk_size, backend="reference")


@gla_attention_op.register_fake
def _(xm: Tensor, v: Tensor, lss: Tensor | None, bank: Tensor, chunk_size: int, rounds: int) -> Tensor:
    return v.new_empty(v.shape)


def _i64(*values: int) -> Any:
    """A 1-D int64 constant."""
    return op.Constant(value_ints=list(values))


def _scalar(value: int) -> Any:
    """A 0-D int64 constant."""
    return op.Constant(value_int=value)


def _dims(*parts: Any) -> Any:
    """A shape for Reshape from ints and 0-D int64 tensors."""
    return op.Concat(*[_i64(p) if isinstance(p, int) else op.Unsqueeze(p, _i64(0)) for p in parts], axis=0)


def _roll_back(x: Any) -> Any:
    """Chunk c gets chunk c - 1 (mod nc) along axis 1 (defined for nc = 1: the chunk itself)."""
    return op.Concat(op.Slice(x, _i64(-1), _i64(_INT64_MAX), _i64(1)), op.Slice(x, _i64(0), _i64(-1), _i64(1)),
                     axis=1)


def _roll_forward(x: Any) -> Any:
    """Chunk c gets chunk c + 1 (mod nc) along axis 1."""
    return op.Concat(op.Slice(x, _i64(1), _i64(_INT64_MAX), _i64(1)), op.Slice(x, _i64(0), _i64(1), _i64(1)),
                     axis=1)


def gla_attention_onnx(xm: Any, v: Any, lss: Any | None, bank: Any, chunk_size: int, rounds: int) -> Any:
    """The ONNX translation of :func:`gla_attention_op` (called by the exporter with graph values): hash, stable
    sort, chunked attention and round merge in default-domain ONNX ops, as the module docstring describes.
    ``lss`` None: no learned score term (NLSA), nothing added."""
    k = chunk_size
    shape = op.Shape(xm)
    n = op.Gather(shape, _scalar(0), axis=0)
    length = op.Gather(shape, _scalar(1), axis=0)
    cm = op.Gather(shape, _scalar(2), axis=0)
    cv = op.Gather(op.Shape(v), _scalar(2), axis=0)

    # Bucket count (DESIGN.md "Semantics") and its slice of the bank.
    whole = op.Div(length, _scalar(k))
    n_buckets = op.Max(op.Min(op.Add(whole, op.Mod(whole, _scalar(2))), _scalar(MAX_BUCKETS)), _scalar(1))
    half = op.Div(n_buckets, _scalar(2))
    offset = op.Add(op.Sub(op.Mul(half, half), half), op.Min(op.Sub(n_buckets, _scalar(1)), _scalar(1)))
    start = op.Unsqueeze(offset, _i64(0))
    rot = op.Slice(bank, start, op.Add(start, op.Unsqueeze(n_buckets, _i64(0))), _i64(2))  # [Cm, R, B]

    # Codes: argmax over b of xm . rot[:, r, b], first maximum on ties; [N, R, L] int64.
    proj = op.MatMul(xm, op.Reshape(rot, _dims(cm, -1)))
    codes = op.ArgMax(op.Reshape(proj, _dims(n, length, rounds, -1)), axis=3, keepdims=0, select_last_index=0)
    codes = op.Transpose(codes, perm=[0, 2, 1])
    # Stable sort: code * L + position is distinct per (n, r), so TopK (ascending, sorted) has no ties to break.
    positions = op.Range(_scalar(0), length, _scalar(1))
    keys = op.Add(op.Mul(codes, length), positions)
    _, perm = op.TopK(keys, op.Unsqueeze(length, _i64(0)), axis=-1, largest=0, sorted=1)

    # Padding (DESIGN.md 1.3): padded slot p >= L holds sorted slot (p - pad) mod L.
    pad = op.Mod(op.Sub(_scalar(k), op.Mod(length, _scalar(k))), _scalar(k))
    padded = op.Add(length, pad)
    chunks = op.Div(padded, _scalar(k))
    extra = op.Mod(op.Sub(op.Range(length, padded, _scalar(1)), pad), length)
    batch = op.Range(_scalar(0), n, _scalar(1))
    input_base = op.Unsqueeze(op.Mul(batch, length), _i64(1))  # [N, 1]: first row of image n in [N L, C]
    slot_base = op.Unsqueeze(op.Mul(batch, padded), _i64(1))  # [N, 1]: first row of image n in [N Lp, C]

    xm_rows = op.Reshape(xm, _dims(-1, cm))
    key_rows = op.Div(xm_rows, op.Max(op.ReduceL2(xm_rows, _i64(-1), keepdims=1),
                                      op.Constant(value_float=KEY_NORM_EPS)))
    v_rows = op.Reshape(v, _dims(-1, cv))
    lss_rows = None if lss is None else op.Reshape(lss, _i64(-1, k))
    all_positions = op.Expand(op.Unsqueeze(positions, _i64(0)), _dims(n, length))

    y = lse = None
    for r in range(rounds):
        order = op.Gather(perm, _scalar(r), axis=1)  # [N, L]: sorted slot -> position
        slots = op.Add(op.Concat(order, op.Gather(order, extra, axis=1), axis=1), input_base)
        flat = op.Reshape(slots, _i64(-1))
        q = op.Reshape(op.Gather(xm_rows, flat, axis=0), _dims(n, chunks, k, cm))
        keys_t = op.Transpose(op.Reshape(op.Gather(key_rows, flat, axis=0), _dims(n, chunks, k, cm)),
                              perm=[0, 1, 3, 2])
        values = op.Reshape(op.Gather(v_rows, flat, axis=0), _dims(n, chunks, k, cv))
        blocks = [op.MatMul(q, keys_t), op.MatMul(q, _roll_back(keys_t)), op.MatMul(q, _roll_forward(keys_t))]
        if lss_rows is not None:
            # learned[.., i, j] = lss[key j, query slot i]
            learned = op.Transpose(op.Reshape(op.Gather(lss_rows, flat, axis=0), _dims(n, chunks, k, k)),
                                   perm=[0, 1, 3, 2])
            blocks = [op.Add(blocks[0], learned), op.Add(blocks[1], _roll_back(learned)),
                      op.Add(blocks[2], _roll_forward(learned))]
        scores = op.Concat(*blocks, axis=3)  # [N, nc, K, 3K]: keys of chunks c, c - 1, c + 1
        top = op.ReduceMax(scores, _i64(3), keepdims=1)
        weights = op.Exp(op.Sub(scores, top))
        total = op.ReduceSum(weights, _i64(3), keepdims=1)
        weights = op.Div(weights, total)
        out = op.Add(
            op.Add(op.MatMul(op.Slice(weights, _i64(0), _i64(k), _i64(3)), values),
                   op.MatMul(op.Slice(weights, _i64(k), _i64(2 * k), _i64(3)), _roll_back(values))),
            op.MatMul(op.Slice(weights, _i64(2 * k), _i64(3 * k), _i64(3)), _roll_forward(values)),
        )
        round_lse = op.Add(top, op.Log(total))

        # Back to position order: position l is sorted slot inverse[l] (a permutation: every entry is written).
        inverse = op.ScatterElements(op.ConstantOfShape(op.Shape(order), value=_ZERO_I64), order, all_positions,
                                     axis=1)
        back = op.Reshape(op.Add(inverse, slot_base), _i64(-1))
        out = op.Reshape(op.Gather(op.Reshape(out, _dims(-1, cv)), back, axis=0), _dims(n, length, cv))
        round_lse = op.Reshape(op.Gather(op.Reshape(round_lse, _i64(-1)), back, axis=0), _dims(n, length, 1))
        if y is None:
            y, lse = out, round_lse
        else:  # running softmax over the rounds' lse (DESIGN.md 1.5 and "Forward")
            top = op.Max(lse, round_lse)
            merged = op.Add(top, op.Log(op.Add(op.Exp(op.Sub(lse, top)), op.Exp(op.Sub(round_lse, top)))))
            y = op.Add(op.Mul(y, op.Exp(op.Sub(lse, merged))), op.Mul(out, op.Exp(op.Sub(round_lse, merged))))
            lse = merged
    return y


class _ExportBlock(nn.Module):
    """What the export form of a hashed-attention block shares: its sizes, its layers (no copy of their
    weights), its rotation bank as a buffer, and the forward around the attention op. The attention runs in
    float32 whatever the dtype of the layers (DESIGN.md "Precision": the projection is IEEE float32, softmax
    and lse are float32); its result is cast back to the input dtype."""

    def __init__(self, block: GLA | NLSA, bank: Tensor | None) -> None:
        super().__init__()
        self.channels = block.channels
        self.chunk_size = block.chunk_size
        self.rounds = block.rounds()
        self.res_scale = block.res_scale
        self.conv_match = block.conv_match
        self.conv_assembly = block.conv_assembly
        self.register_buffer("bank", rotation_bank(block) if bank is None else bank, persistent=False)

    def learned_score(self, x: Tensor) -> Tensor | None:
        """``lss [N, L, K]`` (float32), or None for a block without one."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        n, channels, height, width = x.shape

        def rows(t: Tensor) -> Tensor:  # [N, C, H, W] -> [N, L, C], position l = h W + w
            return t.permute(0, 2, 3, 1).reshape(n, height * width, t.shape[1]).float()

        y = gla_attention_op(rows(self.conv_match(x)), rows(self.conv_assembly(x)), self.learned_score(x),
                             self.bank, self.chunk_size, self.rounds)
        y = y.reshape(n, height, width, channels).permute(0, 3, 1, 2).to(x.dtype)
        return y * self.res_scale + x


class ExportGLA(_ExportBlock):
    """A GLA block's eval-mode forward for export (see the module docstring): its four layers and the bank of
    its rotations."""

    def __init__(self, block: GLA, bank: Tensor | None = None) -> None:
        super().__init__(block, bank)
        self.conv_assembly_fc = block.conv_assembly_fc
        self.fc = block.fc

    def learned_score(self, x: Tensor) -> Tensor:
        n, _, height, width = x.shape
        return self.fc(self.conv_assembly_fc(x).permute(0, 2, 3, 1)).reshape(n, height * width, -1).float()


class ExportNLSA(_ExportBlock):
    """An NLSA block's eval-mode forward for export: its two layers, the bank of its spherical rotations
    ``cat[R, -R]``, and the attention without a learned score (``lss=None``, as ``NLSA.attend`` runs it)."""

    def __init__(self, block: NLSA, bank: Tensor | None = None) -> None:
        super().__init__(block, bank)


class ImageNetwork(nn.Module):
    """``image [N, 3, H, W]`` in [0, 1] -> ``[N, 3, sH, sW]`` in [0, 1]: the network's ``[0, rgb_range]`` applied
    inside (as the spandrel descriptor does), the result clipped to [0, 1] (what an 8-bit image keeps)."""

    def __init__(self, network: nn.Module, rgb_range: float) -> None:
        super().__init__()
        self.network = network
        self.rgb_range = float(rgb_range)

    def forward(self, image: Tensor) -> Tensor:
        return (self.network(image * self.rgb_range) / self.rgb_range).clamp(0.0, 1.0)


def _swap_gla(model: nn.Module) -> int:
    """Replaces every GLA (NLSA) block inside ``model`` by an ExportGLA (ExportNLSA) in place; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (GLA, NLSA)):
                setattr(parent, name, ExportGLA(child) if isinstance(child, GLA) else ExportNLSA(child))
                swapped += 1
    return swapped


def export_network(model: nn.Module, dtype: torch.dtype = torch.float32) -> ImageNetwork:
    """The export module of a loaded network (eval mode, inference seed set): a deep copy with every GLA
    block swapped for :class:`ExportGLA`, layers in ``dtype``, wrapped in :class:`ImageNetwork`. ``model``
    itself is left as it is."""
    if getattr(model, "compute_dtype", "float32") != "float32":
        raise ValueError("export the float32 network; --dtype chooses the graph's dtype")
    config = getattr(model, "config", {})
    net = copy.deepcopy(model).eval().to("cpu").to(dtype)
    _swap_gla(net)  # after the cast: the banks stay float32 (the hash is float32 for every dtype)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return ImageNetwork(net, float(config.get("rgb_range", 255.0))).eval()
