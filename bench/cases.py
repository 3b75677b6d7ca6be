"""Benchmark cases: builders that allocate inputs and return a ``run()`` callable.

Every builder takes plain keyword arguments (so :mod:`bench.memory` can rebuild the same case in a
child process) plus ``device``, allocates everything it needs, and returns ``run()``: one call of
the thing measured, synchronised on CUDA so wall-clock timing is right. The pytest benchmarks
(``bench/test_bench_*.py``) and the GPU script reuse them.

Implementations (``impl``) compared on the same tensors:

* ``fused-<backend>``: ``dlsn_kernels.gla_attention(..., backend=<backend>)`` (cpu, cuda, triton);
* ``nlsa-<backend>``: NLSN's attention on our kernels, ``gla_attention(xm, v, None, spherical_rotations(rot_half))``
  (no learned score, NLSN's spherical hash with the same Gaussian rotations as ``nlsn-style``): the like-for-like
  row against ``nlsn-style``; in the block group an ``NLSA`` block against ``NLSAttention``;
* ``reference``: the same call with ``backend="reference"`` (plain PyTorch, materialising);
* ``nlsn-style``: :func:`bench.baselines.nlsn_attention` (no learned score, Gaussian hashing);
* ``dlsn-style``: :func:`bench.baselines.dlsn_attention` with ``fc`` on every key copy;
* ``flex-gla``: :func:`bench.baselines.flex_gla_attention`, GLA as FlexAttention (compiled on CUDA; on the
  CPU eager and forward only, so its forward + backward there is "Not run", see :func:`impl_unavailable_reason`).

Core inputs: ``xm [N, L, Cm]``, ``v [N, L, Cv]``, ``f [N, L, Cv]`` and ``fc`` (``Cv -> K -> K``).
The DLSN family's timed region includes the learned score: ``lss = fc(f)`` once per position for
``fused-*``, ``reference`` and ``flex-gla``, ``fc`` on every key copy for ``dlsn-style``. ``nlsn-style`` has no
learned score and uses ``xm`` and ``v`` only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench import baselines

__all__ = [
    "CORE_IMPLS_BASELINE",
    "core_case",
    "gla_case",
    "model_case",
    "network_case",
    "allocation_case",
    "fused_impl",
    "backend_of",
    "impl_unavailable_reason",
    "estimate_core_bytes",
    "estimate_gla_bytes",
]

# The implementations that are not ours (always runnable, plain PyTorch).
CORE_IMPLS_BASELINE = ("reference", "nlsn-style", "dlsn-style", "flex-gla")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def fused_impl(backend: str) -> str:
    return f"fused-{backend}"


def nlsa_impl(backend: str) -> str:
    return f"nlsa-{backend}"


def backend_of(impl: str) -> str | None:
    """The ``dlsn_kernels`` backend an impl runs on, or None for the baselines."""
    for prefix in ("fused-", "nlsa-"):
        if impl.startswith(prefix):
            return impl[len(prefix) :]
    return "reference" if impl == "reference" else None


def impl_unavailable_reason(impl: str, device: str, backward: bool) -> str | None:
    """Why a baseline cannot run this case here (None: it can). Fused impls: see dlsn_kernels.available_backends."""
    if impl != "flex-gla":
        return None
    from dlsn_kernels.backends import BACKENDS

    why = "; ".join(BACKENDS["flex"].device_reasons(torch.device(device))) or None
    if why is None and backward and torch.device(device).type == "cpu":
        why = "flex-gla has no backward on CPU tensors (compiled FlexAttention has no CPU backward)"
    return why


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _score_mlp(channels: int, chunk_size: int) -> nn.Sequential:
    """GLA's ``fc``: Linear(C, K), ReLU, Linear(K, K)."""
    return nn.Sequential(nn.Linear(channels, chunk_size), nn.ReLU(inplace=True), nn.Linear(chunk_size, chunk_size))


def core_case(
    impl: str,
    n: int,
    h: int,
    w: int,
    cm: int,
    cv: int,
    k: int,
    r: int,
    backward: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Callable[[], None]:
    """The attention core on ``L = h*w`` positions: forward (no graph) or forward + backward."""
    import dlsn_kernels

    dev = torch.device(device)
    tdtype = _DTYPES[dtype]
    length = h * w
    n_buckets = baselines.n_buckets_for(length, k)
    gen = torch.Generator().manual_seed(seed)
    # Inputs are drawn on the CPU with a seed, so every impl and device sees the same numbers.
    xm = torch.randn(n, length, cm, generator=gen).to(dev, tdtype)
    v = torch.randn(n, length, cv, generator=gen).to(dev, tdtype)
    f = torch.randn(n, length, cv, generator=gen).to(dev, tdtype).relu_()
    torch.manual_seed(seed)
    fc = _score_mlp(cv, k).to(dev, tdtype)
    rot = dlsn_kernels.random_rotations(cm, r, n_buckets, generator=gen, device=dev, dtype=tdtype)
    rot_half = baselines.gaussian_rotations(cm, r, n_buckets, generator=gen).to(dev, tdtype)

    backend = backend_of(impl)
    if impl.startswith("nlsa-"):
        spherical = dlsn_kernels.spherical_rotations(rot_half)

        def forward() -> Tensor:
            return dlsn_kernels.gla_attention(xm, v, None, spherical, k, backend=backend)
    elif backend is not None:

        def forward() -> Tensor:
            return dlsn_kernels.gla_attention(xm, v, fc(f), rot, k, backend=backend)
    elif impl == "nlsn-style":

        def forward() -> Tensor:
            return baselines.nlsn_attention(xm, v, k, rot_half=rot_half)
    elif impl == "dlsn-style":

        def forward() -> Tensor:
            return baselines.dlsn_attention(xm, v, k, f=f, fc=fc, rot=rot)
    elif impl == "flex-gla":

        def forward() -> Tensor:
            return baselines.flex_gla_attention(xm, v, fc(f), k, rot=rot)
    else:
        raise ValueError(f"unknown impl {impl!r}; use fused-<backend>, {', '.join(CORE_IMPLS_BASELINE)}")

    sync = _synchronizer(dev)
    if not backward:

        def run() -> None:
            with torch.no_grad():
                forward()
            sync()

        return run

    leaves = [xm, v] if impl == "nlsn-style" or impl.startswith("nlsa-") else [xm, v, f]
    for t in leaves:
        t.requires_grad_(True)
    grad_y = torch.randn(n, length, cv, generator=gen).to(dev, tdtype)

    def run_backward() -> None:
        for t in leaves:
            t.grad = None
        fc.zero_grad(set_to_none=True)
        forward().backward(grad_y)
        sync()

    return run_backward


def _gla_module(impl: str, channels: int, reduction: int, k: int, r: int) -> nn.Module:
    from dlsn.models import GLA, NLSA

    backend = backend_of(impl)
    if impl.startswith("nlsa-"):
        return NLSA(channels, reduction=reduction, chunk_size=k, n_hashes=r, backend=backend)
    if backend is not None:
        return GLA(channels, reduction=reduction, chunk_size=k, n_hashes=r, backend=backend)
    if impl == "nlsn-style":
        return baselines.NLSAttention(channels, reduction=reduction, chunk_size=k, n_hashes=r)
    if impl == "dlsn-style":
        return baselines.DLSNStyleGLA(channels, reduction=reduction, chunk_size=k, n_hashes=r)
    if impl == "flex-gla":  # the same block with its attention on the FlexAttention formulation
        return GLA(channels, reduction=reduction, chunk_size=k, n_hashes=r, backend="flex")
    raise ValueError(f"unknown impl {impl!r}; use fused-<backend>, {', '.join(CORE_IMPLS_BASELINE)}")


def gla_case(
    impl: str,
    channels: int,
    size: int,
    k: int,
    r: int,
    reduction: int = 4,
    n: int = 1,
    backward: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> Callable[[], None]:
    """A whole attention block (convolutions included) on ``[n, channels, size, size]``."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    module = _gla_module(impl, channels, reduction, k, r).to(dev)
    x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed)).to(dev)
    sync = _synchronizer(dev)
    if not backward:
        module.eval()

        def run() -> None:
            with torch.no_grad():
                module(x)
            sync()

        return run

    module.train()
    x.requires_grad_(True)

    def run_backward() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
        sync()

    return run_backward


def model_case(
    preset: str,
    scale: int,
    size: int,
    backend: str,
    n: int = 1,
    seed: int = 0,
    device: str = "cpu",
) -> Callable[[], None]:
    """A whole network (``dlsn.models.build_model``) in eval mode on an ``n x 3 x size x size`` image."""
    from dlsn.models import build_model

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(preset, scale, backend=backend).to(dev).eval()
    image = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dev) * 255.0
    sync = _synchronizer(dev)

    def run() -> None:
        with torch.no_grad():
            model(image)
        sync()

    return run


def network_case(impl: str, preset: str, size: int, device: str = "cpu", **kwargs) -> Callable[[], None]:
    """A whole network's train step or inference, ours or DLSN-style: :func:`bench.network.network_case`."""
    from bench.network import network_case as build

    return build(impl, preset, size, device=device, **kwargs)


def allocation_case(megabytes: float, device: str = "cpu") -> Callable[[], None]:
    """A known allocation (``megabytes`` of float32, every page written): calibrates bench.memory."""
    dev = torch.device(device)
    count = int(megabytes * 2**20 / 4)
    sync = _synchronizer(dev)

    def run() -> None:
        block = torch.ones(count, device=dev)
        del block
        sync()

    return run


# ----------------------------------------------------------------------------------------------
# Memory estimates, to skip a materialising baseline that would not fit. Counted in elements per
# sorted slot (N * R * Lp slots), from the tensors each implementation keeps alive at its peak,
# then scaled to measured peaks (bench/NOTES.md). They are estimates: good to ~1.5x.

_SLOT_ELEMENTS = {
    # impl, backward: elements per slot per Cm, per Cv, per K. Fitted to peaks measured at
    # 192x192, Cm=64, Cv=256, K=128, R=3 on the CPU (measured/estimate within 0.8-1.3x from 48x48 up).
    ("nlsn-style", False): (5.6, 5.6, 6.7),
    ("nlsn-style", True): (5.8, 7.7, 8.7),
    ("dlsn-style", False): (3.4, 6.7, 10.1),
    ("dlsn-style", True): (4.5, 9.8, 13.6),
    ("reference", False): (4.6, 4.6, 9.2),
    ("reference", True): (4.8, 6.5, 12.1),
}


def estimate_core_bytes(
    impl: str,
    n: int,
    h: int,
    w: int,
    cm: int,
    cv: int,
    k: int,
    r: int,
    backward: bool = False,
    dtype: str = "float32",
    device_type: str = "cpu",
) -> int:
    """Rough peak extra bytes of one core call; fused kernels need only their outputs (+ grads)."""
    dtype_bytes = _DTYPES[dtype].itemsize
    length = h * w
    lp = length + (k - length % k) % k
    if backend_of(impl) not in (None, "reference"):
        learned = 0 if impl.startswith("nlsa-") else k  # lss and its gradient
        per_position = cv + learned + (2 * cm + 3 * cv + learned if backward else 0)
        return n * length * per_position * dtype_bytes
    if impl == "flex-gla":
        # gathered copies per flex slot (chunks rounded up to 16 slots): q, keys, v, lss, out (+ grads); on the
        # CPU the eager path also holds the [N, R, S, S] scores in float32 (a few copies: scores, mask, softmax)
        slots = n * r * -(-lp // k) * (-(-k // 16) * 16)
        copies = slots * (2 * cm + 2 * cv + k) * (2 if backward else 1) * dtype_bytes
        dense = 3 * n * r * (slots // (n * r)) ** 2 * 4 if device_type == "cpu" else 0
        return int(copies + dense)
    a, b, c = _SLOT_ELEMENTS[("reference" if backend_of(impl) == "reference" else impl, backward)]
    slots = n * r * lp
    hashing = n * r * length * (1.5 * baselines.n_buckets_for(length, k) + 4)  # projections, codes
    return int(max(slots * (a * cm + b * cv + c * k), hashing) * dtype_bytes)


def estimate_gla_bytes(impl: str, channels: int, size: int, k: int, r: int, reduction: int = 4, n: int = 1) -> int:
    """Rough forward peak of a whole block: the core plus its three ``[N, C, H, W]`` feature maps."""
    core = estimate_core_bytes(impl, n, size, size, channels // reduction, channels, k, r)
    return core + 4 * n * channels * size * size * 4
