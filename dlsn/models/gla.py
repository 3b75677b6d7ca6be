"""Global Learnable Attention (GLA) as a network block (DESIGN.md "Semantics").

The four layers carry the authors' parameter names (``conv_match``, ``conv_assembly``,
``conv_assembly_fc``, ``fc``) so their checkpoints load unchanged. The attention itself (hashing,
sorting, chunked attention, round combination) is one call to :func:`dlsn_kernels.gla_attention`.

Hash rotations: in training every forward call draws fresh rotations from PyTorch's global
random generator, as the authors do. In evaluation the same happens unless an inference seed is
set (:meth:`GLA.set_inference`): then every forward call draws its rotations from a new generator
seeded with that value, so the same input gives the same output on every call, in any call order,
on any device (rotations are drawn on the CPU and then moved).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import dlsn_kernels
from dlsn_kernels import _checks

from .residual import scaled_residual

__all__ = ["GLA", "set_backend", "set_inference"]


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # Sequential so the weights are named ``<layer>.0.weight`` as in the authors' BasicBlock.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class GLA(nn.Module):
    """``GLA(x) = attention(x) * res_scale + x`` on ``x [N, C, H, W]``.

    Args:
        channels: C, channels of the input and output.
        reduction: ``C / reduction`` channels of the match features ``xm`` used for hashing and
            similarity (64 in the paper: C = 256, reduction = 4).
        chunk_size: K, positions per attention chunk, also the width of the learned score
            ``fc``. 144 is the authors' code default; the paper trained with 128.
        n_hashes: R, hash rounds (3 in the paper).
        res_scale: scale of the attention output before the skip connection.
        backend: kernel backend passed to :func:`dlsn_kernels.gla_attention` (None: automatic;
            ``"reference"`` runs without compiled kernels).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        chunk_size: int = 144,
        n_hashes: int = 3,
        res_scale: float = 1.0,
        backend: str | None = None,
    ) -> None:
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
        # Evaluation-only overrides, see set_inference.
        self.inference_n_hashes: int | None = None
        self.inference_seed: int | None = None

        self.conv_match = _conv_relu(channels, channels // reduction)
        self.conv_assembly = _conv_relu(channels, channels)
        self.conv_assembly_fc = _conv_relu(channels, channels)
        self.fc = nn.Sequential(
            nn.Linear(channels, chunk_size), nn.ReLU(inplace=True), nn.Linear(chunk_size, chunk_size)
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, chunk_size={self.chunk_size}, "
            f"n_hashes={self.n_hashes}, res_scale={self.res_scale}, backend={self.backend!r}"
        )

    def set_inference(self, n_hashes: int | None = None, seed: int | None = None) -> None:
        """Hash rounds and rotation seed used in eval mode; None restores the training behaviour
        (``self.n_hashes`` rounds, fresh random rotations on every call). Training is unaffected."""
        self.inference_n_hashes = None if n_hashes is None else _check_positive_int(n_hashes, "n_hashes")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.inference_seed = seed

    def rounds(self) -> int:
        """Hash rounds the next forward call uses."""
        if not self.training and self.inference_n_hashes is not None:
            return self.inference_n_hashes
        return self.n_hashes

    def rotations(
        self, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """``rot [Cm, R, B]`` (float32) for a feature map of ``length = H*W`` positions."""
        if generator is None and not self.training and self.inference_seed is not None:
            generator = torch.Generator().manual_seed(self.inference_seed)
        n_buckets = dlsn_kernels.n_buckets_for(length, self.chunk_size)
        return dlsn_kernels.random_rotations(
            self.channels // self.reduction,
            self.rounds(),
            n_buckets,
            generator=generator,
            device=device,
            dtype=torch.float32,
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
        if dtype in (torch.float16, torch.bfloat16) and not _checks.resolved_takes_half(x.device, self.backend):
            dtype = torch.float32
        xm, v, lss = (t.to(dtype).contiguous() for t in (xm, v, lss))  # no-ops when already so
        rot = self.rotations(length, x.device, generator).to(dtype)

        # Autocast must not re-cast inside the reference path; the op sees exactly these dtypes.
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = dlsn_kernels.gla_attention(xm, v, lss, rot, self.chunk_size, backend=self.backend)
        y = y.reshape(n, height, width, self.channels).permute(0, 3, 1, 2)
        return scaled_residual(y, x, self.res_scale)


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Sets the kernel backend of every GLA block inside ``model``."""
    for module in model.modules():
        if isinstance(module, GLA):
            module.backend = backend


def set_inference(model: nn.Module, n_hashes: int | None = None, seed: int | None = None) -> None:
    """Eval-mode hash rounds and rotation seed of every GLA block inside ``model``.

    Block i (in ``model.modules()`` order) gets its own seed derived from ``seed`` and i, so the
    blocks draw different rotations while the whole network stays reproducible.
    """
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    blocks = [m for m in model.modules() if isinstance(m, GLA)]
    for index, block in enumerate(blocks):
        block_seed = None if seed is None else (seed * 1_000_003 + index) % (2**63)
        block.set_inference(n_hashes=n_hashes, seed=block_seed)
