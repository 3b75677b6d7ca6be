"""Global Learnable Attention (GLA) as a network block (DESIGN.md "Semantics").

The four layers carry the authors' parameter names (``conv_match``, ``conv_assembly``,
``conv_assembly_fc``, ``fc``) so their checkpoints load unchanged. The attention itself (hashing,
sorting, chunked attention, round combination) is one call to :func:`dlsn_kernels.gla_attention`.

Hash rotations
--------------
Training: every forward call draws fresh rotations from PyTorch's global random generator, as the
authors do.

Evaluation (``model.eval()``): repeatable by default. Each block has an inference seed, and every
forward call draws its rotations from a new generator seeded with it, so the same input gives bitwise
the same output on every call, in any call order. The authors' code draws fresh rotations in
evaluation too (so their scores vary slightly from run to run); ``set_inference(model, seed=None)``
restores that.

The draw, for exporters that reproduce it (``dlsn.onnx_graph`` builds its rotation bank from it): the
rotations of a block with inference seed ``s`` for a feature map of ``L = H*W`` positions are ::

    B = dlsn_kernels.n_buckets_for(L, chunk_size)
    rot = dlsn_kernels.random_rotations(channels // reduction, R, B,
                                        generator=torch.Generator().manual_seed(s))   # [Cm, R, B] float32

drawn on the CPU (then moved to the input's device), R being :meth:`GLA.rounds`. They depend on the
seed, Cm, R and B only, not on the input's values, batch size or device. Seeds:

* a block built on its own has seed ``0``;
* :func:`set_inference` ``(model, seed=S)`` gives the i-th GLA block of ``model`` (``model.modules()``
  order) the seed :func:`block_seed` ``(S, i) = (S * 1_000_003 + i) mod 2**63``; the networks of this
  package (DLSN, EDSR+GLA) do this with ``S = 0`` when they are built, which is also the tools'
  ``--seed`` default, so ``dlsn.eval`` / ``dlsn.upscale`` without ``--seed`` match a plain
  ``model.eval()``. In a network of your own with several GLA blocks, call ``set_inference(model)``
  once so that the blocks draw different rotations (without it they all use seed 0).

Under ``torch.compile`` the seeded draw is one opaque custom op (``dlsn::seeded_rotations``), so an
eval-mode model compiles without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import dlsn_kernels

from .residual import scaled_residual

__all__ = [
    "DEFAULT_INFERENCE_SEED", "GLA", "HashedAttentionBlock", "block_seed", "seeded_rotations", "set_backend",
    "set_inference",
]

# The inference seed of a block built on its own, and the base seed set_inference and the networks use when
# none is given (the tools' --seed default too).
DEFAULT_INFERENCE_SEED = 0
# torch.Generator.manual_seed takes [-2**63, 2**64); a custom op's int is int64, so seeds are passed on as the
# int64 with the same 64 bits (manual_seed(s) and manual_seed(s - 2**64) seed the generator identically).
_SEED_LOW, _SEED_HIGH = -(2**63), 2**64


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or not _SEED_LOW <= seed < _SEED_HIGH:
        raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {seed!r}")
    return seed


def _as_int64(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def block_seed(seed: int, index: int) -> int:
    """Inference seed of the ``index``-th GLA block (``model.modules()`` order) under base seed ``seed``:
    ``(seed * 1_000_003 + index) mod 2**63``, so every block draws its own rotations."""
    return (seed * 1_000_003 + index) % (2**63)


def _draw_seeded_rotations(seed: int, channels: int, n_hashes: int, n_buckets: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return dlsn_kernels.random_rotations(channels, n_hashes, n_buckets, generator=generator, dtype=torch.float32)


seeded_rotations = torch.library.custom_op("dlsn::seeded_rotations", mutates_args=())(_draw_seeded_rotations)
seeded_rotations.__doc__ = """``[channels, n_hashes, n_buckets]`` float32 CPU rotations drawn from a generator
seeded with ``seed`` (:func:`dlsn_kernels.random_rotations`). A custom op so that torch.compile treats the seeded
draw (a ``torch.Generator`` made on every call) as one opaque call instead of breaking the graph there; eager
calls use the plain function (:func:`eager_or_op`)."""


def eager_or_op(op, plain):
    """``op`` (a Python custom op) while torch.compile or torch.export traces, else ``plain``, its function.

    Eagerly the op would run ``plain`` all the same, but behind a ``torch._disable_dynamo`` wrapper whose first
    call imports torch._dynamo: about 115 MB of resident memory and a second or two, once per process, for
    nothing (measured on the first call of an NLSN network, 2026-12-07).
    """
    return op if torch.compiler.is_compiling() else plain


@seeded_rotations.register_fake
def _seeded_rotations_fake(seed: int, channels: int, n_hashes: int, n_buckets: int) -> Tensor:
    return torch.empty(channels, n_hashes, n_buckets, dtype=torch.float32, device="cpu")


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # Sequential so the weights are named ``<layer>.0.weight`` as in the authors' BasicBlock.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class HashedAttentionBlock(nn.Module):
    """What every hashed-attention block (GLA, NLSA) shares: its sizes, kernel backend and eval-mode settings.

    :func:`set_backend` and :func:`set_inference` reach every instance inside a network.
    """

    def __init__(self, channels: int, reduction: int, chunk_size: int, n_hashes: int, res_scale: float,
                 backend: str | None) -> None:
        super().__init__()
        _check_positive_int(channels, "channels")
        _check_positive_int(reduction, "reduction")
        if channels % reduction != 0:
            raise ValueError(f"channels ({channels}) must be divisible by reduction ({reduction})")
        self.channels = channels
        self.reduction = reduction
        self.chunk_size = _check_positive_int(chunk_size, "chunk_size")
        self.n_hashes = _check_positive_int(n_hashes, "n_hashes")
        self.res_scale = float(res_scale)
        self.backend = backend
        # Evaluation-only settings, see set_inference.
        self.inference_n_hashes: int | None = None
        self.inference_seed: int | None = DEFAULT_INFERENCE_SEED

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, chunk_size={self.chunk_size}, "
            f"n_hashes={self.n_hashes}, res_scale={self.res_scale}, backend={self.backend!r}"
        )

    def set_inference(self, n_hashes: int | None = None, seed: int | None = DEFAULT_INFERENCE_SEED) -> None:
        """Eval-mode settings of this block. Training is unaffected.

        Args:
            n_hashes: hash rounds in eval mode; None: the training count ``self.n_hashes``.
            seed: the generator seed of this block's eval-mode rotations (used as given; the
                network-wide :func:`set_inference` derives one per block); None: fresh random
                rotations on every call, as the authors' code does.
        """
        self.inference_n_hashes = None if n_hashes is None else _check_positive_int(n_hashes, "n_hashes")
        self.inference_seed = _check_seed(seed)

    def rounds(self) -> int:
        """Hash rounds the next forward call uses."""
        if not self.training and self.inference_n_hashes is not None:
            return self.inference_n_hashes
        return self.n_hashes


class GLA(HashedAttentionBlock):
    """Global Learnable Attention block: ``GLA(x) = attention(x) * res_scale + x``.

    Takes and returns feature maps ``x [N, C, H, W]`` (NCHW, like a convolution), so it drops into a
    convolutional network anywhere a residual block fits. Inside, three 3x3 conv + ReLU layers turn ``x``
    into the op's row layout ``[N, L, C]`` with ``L = H*W`` positions (position ``h*W + w``): the match
    features ``xm [N, L, C/reduction]`` (hashed and compared), the values ``v [N, L, C]``, and the
    features of the learned similarity score, which ``fc`` (Linear C->K, ReLU, Linear K->K) turns into
    ``lss [N, L, K]``. :func:`dlsn_kernels.gla_attention` then hashes the positions into buckets
    (SB-LSH, R rounds), attends within chunks of K sorted positions and their two neighbouring chunks,
    and combines the rounds; the result goes back to NCHW. Any H and W work (L need not be a multiple
    of K).

    Args:
        channels: C, channels of the input and output (256 in the paper's DLSN).
        reduction: the match features have ``C / reduction`` channels (4 in the paper: 64 of 256);
            C must be divisible by it.
        chunk_size: K, positions per attention chunk, also the width of the learned score ``fc``
            (so a checkpoint fixes it). 128, the paper's value and that of the authors' released
            DLSN weights and training commands (their code's built-in default, 144, is overridden
            by every command they publish).
        n_hashes: R, hash rounds in training (3 in the paper); evaluation may use another count
            (:meth:`set_inference`).
        res_scale: scale of the attention output before the skip connection (the authors use 1
            here and scale the whole module around it).
        backend: kernel backend of :func:`dlsn_kernels.gla_attention` (None: automatic;
            ``"reference"`` runs without compiled kernels); :func:`set_backend` sets it network-wide.

    Rotations: fresh random ones per call in training; in eval mode drawn from the block's inference
    seed (0 unless set), so evaluation repeats bitwise. See the module docstring and
    :func:`set_inference`.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        chunk_size: int = 128,
        n_hashes: int = 3,
        res_scale: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, reduction, chunk_size, n_hashes, res_scale, backend)
        self.conv_match = _conv_relu(channels, channels // reduction)
        self.conv_assembly = _conv_relu(channels, channels)
        self.conv_assembly_fc = _conv_relu(channels, channels)
        self.fc = nn.Sequential(
            nn.Linear(channels, chunk_size), nn.ReLU(inplace=True), nn.Linear(chunk_size, chunk_size)
        )

    def rotations(
        self, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """``rot [Cm, R, B]`` (float32, on ``device``) for a feature map of ``length = H*W`` positions.

        Drawn from ``generator`` when given; else, in eval mode with an inference seed, from that seed
        (the same tensor on every call); else from PyTorch's global generator.
        """
        n_buckets = dlsn_kernels.n_buckets_for(length, self.chunk_size)
        match_channels = self.channels // self.reduction
        if generator is None and not self.training and self.inference_seed is not None:
            draw = eager_or_op(seeded_rotations, _draw_seeded_rotations)
            rot = draw(_as_int64(self.inference_seed), match_channels, self.rounds(), n_buckets)
            return rot.to(device)
        return dlsn_kernels.random_rotations(
            match_channels, self.rounds(), n_buckets, generator=generator, device=device, dtype=torch.float32
        )

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x [N, C, H, W] -> [N, C, H, W]``. ``generator`` (a CPU generator), when given, draws
        the rotations instead of the rule described in the module docstring."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [N, {self.channels}, H, W], got {tuple(x.shape)}")
        n, _, height, width = x.shape
        length = height * width

        def rows(t: Tensor) -> Tensor:  # [N, C, H, W] -> [N, L, C], position l = h * W + w
            return t.permute(0, 2, 3, 1).reshape(n, length, t.shape[1]).contiguous()

        xm = rows(self.conv_match(x))
        v = rows(self.conv_assembly(x))
        # The learned score of a key depends on the key only, so fc runs once per position
        # (the authors run it on every key copy, 3R times, with the same result).
        lss = self.fc(rows(self.conv_assembly_fc(x)))

        # One dtype for the op (autocast may leave them different). The kernels read float16/bfloat16 rows as
        # they are (float32 inside), so under autocast nothing is widened or copied here; only Triton's CPU
        # interpreter takes float32 alone.
        dtype = v.dtype
        if dtype in (torch.float16, torch.bfloat16) and not dlsn_kernels.resolved_takes_half(x.device, self.backend):
            dtype = torch.float32
        xm, v, lss = (t.to(dtype).contiguous() for t in (xm, v, lss))  # no-ops when already so
        rot = self.rotations(length, x.device, generator).to(dtype)

        # Autocast must not re-cast inside the reference path; the op sees exactly these dtypes.
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = dlsn_kernels.gla_attention(xm, v, lss, rot, self.chunk_size, backend=self.backend)
        y = y.reshape(n, height, width, self.channels).permute(0, 3, 1, 2)
        return scaled_residual(y, x, self.res_scale)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, HashedAttentionBlock)


def has_attention_blocks(model: nn.Module) -> bool:
    """Whether ``model`` holds a GLA (or NLSA) block, i.e. whether dlsn_kernels runs in it."""
    return any(_is_block(m) for m in model.modules())


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Sets the kernel backend of every GLA block (and NLSA block: every ``HashedAttentionBlock``) inside ``model``
    (``model`` itself included).

    ``backend``: None (automatic: the fastest backend that runs on the input's device and dtype),
    ``"reference"`` (plain PyTorch, no compiled kernels), ``"cpu"``, ``"cuda"``, ``"triton"``, or another
    name :func:`dlsn_kernels.available_backends` lists. Nothing is checked here; an unknown or
    unavailable backend is refused, with the reason, by the first forward call.
    """
    for module in model.modules():
        if _is_block(module):
            module.backend = backend


def set_inference(
    model: nn.Module, n_hashes: int | None = None, seed: int | None = DEFAULT_INFERENCE_SEED
) -> None:
    """Eval-mode hash rounds and rotation seeds of every GLA block (and NLSA block: every ``HashedAttentionBlock``)
    inside ``model``. Training is unaffected.

    Args:
        model: a GLA block or any module containing them.
        n_hashes: hash rounds in eval mode (the paper: more rounds, better scores, more time);
            None: each block's training count.
        seed: base seed (default 0, as the networks here are built and the tools' ``--seed``
            default): the i-th block in ``model.modules()`` order draws from :func:`block_seed`
            ``(seed, i)``, so blocks differ while the network repeats bitwise. None: fresh random
            rotations on every eval call, as the authors' code does (scores then vary run to run).
    """
    seed = _check_seed(seed)
    blocks = [m for m in model.modules() if _is_block(m)]
    for index, block in enumerate(blocks):
        block.set_inference(n_hashes=n_hashes, seed=None if seed is None else block_seed(seed, index))
