"""Whole-network cases (bench group ``network``): DLSN with our fused attention against the same
network with the authors' attention written their way (:class:`bench.baselines.DLSNStyleGLA`, with
their unstable ``torch.sort``), the same weights, a train step (forward + L1 loss + backward) or one
inference call.

Implementations (``impl``):

* ``fused-<backend>``: ``dlsn.models.build_model(preset, scale, backend=<backend>)`` in float32;
* ``fused-<backend>-bf16``: the same under ``torch.autocast(<device>, dtype=torch.bfloat16)``;
* ``dlsn-style``: the same network and weights, every ``GLA`` swapped for ``DLSNStyleGLA``, float32
  (``dlsn-style-bf16``: under bf16 autocast, as the GPU session runs it);
* ``nlsn-style`` (``nlsn`` / ``nlsn_small`` presets): every ``NLSA`` swapped for :class:`NLSNStyleNLSA`, the
  authors' NonLocalSparseAttention written their way (fresh Gaussian rotations, their unstable sort); the
  baseline of the NLSN rows, as ``dlsn-style`` is of the DLSN ones (:func:`network_impls`).

:func:`network_case` is a builder in the sense of :mod:`bench.cases` (plain keyword arguments, returns
``run()``), so :mod:`bench.memory` rebuilds it in a child process; ``bench.cases.network_case`` points
here. :func:`measure_network` is the pytest step: it times with pytest-benchmark and measures the peak
in a child, with fewer rounds for cases that take tens of seconds on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import baselines
from bench.harness import BenchConfig, measure, skip_if_too_big, skip_unless_backend_runs

__all__ = [
    "BF16_SUFFIX",
    "NetworkCase",
    "build_network",
    "dlsn_style_network",
    "estimate_network_bytes",
    "measure_network",
    "network_case",
    "network_cases",
    "network_impls",
    "NLSNStyleNLSA",
    "nlsn_style_network",
]

BF16_SUFFIX = "-bf16"
GROUP = "network"
NLSN_GROUP = "network-nlsn"  # the NLSN rows: their own group, with nlsn-style as base


class NetworkCase(NamedTuple):  # a tuple, so pytest-benchmark can write it into its JSON
    """One whole-network case: ``preset`` x``scale`` on ``n`` images of ``size x size`` LR pixels."""

    preset: str
    size: int
    n: int = 1
    train: bool = False
    scale: int = 2

    @property
    def label(self) -> str:
        what = f"train N={self.n}" if self.train else ("infer" if self.n == 1 else f"infer N={self.n}")
        return f"{self.preset} x{self.scale} {what} {self.size}x{self.size}"

    @property
    def id(self) -> str:
        return self.label.replace(" ", "-").replace("=", "")

    @property
    def heavy(self) -> bool:
        """Tens of seconds per call on a 2-core CPU: one timed round, no warm-up calls."""
        return self.preset in ("paper", "nlsn") or self.size >= 512


def network_cases(quick: bool) -> list[NetworkCase]:
    """The issue-19 cases: train step at N=1 and 4 on 48x48, inference at 96, 192 and 512 (``small`` and
    ``paper``), and NLSN (issue 27): ``nlsn_small`` train step on 48x48, the paper's ``nlsn`` inference on
    128x128. Quick mode: the ``tiny`` preset on 16x16 (train) and 24x24 (inference), ``nlsn_small`` on 24x24."""
    if quick:
        return [NetworkCase("tiny", 16, n=1, train=True), NetworkCase("tiny", 24), NetworkCase("nlsn_small", 24)]
    out = []
    for preset in ("small", "paper"):
        out += [NetworkCase(preset, 48, n=n, train=True) for n in (1, 4)]
        out += [NetworkCase(preset, size) for size in (96, 192, 512)]
    return [*out, NetworkCase("nlsn_small", 48, n=1, train=True), NetworkCase("nlsn", 128)]


def network_impls(backends: tuple[str, ...], preset: str = "tiny") -> list[str]:
    """Ours in float32 and under bf16 autocast, per backend, then the authors' attention written their way:
    the DLSN-style network, or NLSN-style for the NLSN presets."""
    out = []
    for backend in backends:
        out += [f"fused-{backend}", f"fused-{backend}{BF16_SUFFIX}"]
    return [*out, "nlsn-style" if preset.startswith("nlsn") else "dlsn-style"]


def _split_impl(impl: str) -> tuple[str, bool]:
    """``fused-cpu-bf16`` -> (``fused-cpu``, True); ``dlsn-style`` -> (``dlsn-style``, False)."""
    if impl.endswith(BF16_SUFFIX):
        return impl[: -len(BF16_SUFFIX)], True
    return impl, False


def dlsn_style_network(model: nn.Module, stable: bool = False) -> nn.Module:
    """``model`` with every ``dlsn.models.GLA`` replaced, in place, by a ``DLSNStyleGLA`` holding its weights.

    ``stable=False`` is the authors' own unstable sort. Returns ``model``.
    """
    from dlsn.models import GLA

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GLA):
                swap = baselines.DLSNStyleGLA(child.channels, child.reduction, child.chunk_size, child.n_hashes,
                                              child.res_scale, stable=stable)
                swap.load_state_dict(child.state_dict())
                setattr(parent, name, swap.to(next(child.parameters()).device))
    return model


class NLSNStyleNLSA(baselines.NLSAttention):
    """NLSN's attention block as the authors run it: :class:`bench.baselines.NLSAttention` (fresh Gaussian
    rotations per call) with their ``torch.sort`` (``stable=False``) unless ``stable``."""

    def __init__(self, *args, stable: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stable = stable

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        xm = baselines._to_rows(self.conv_match(x))
        v = baselines._to_rows(self.conv_assembly(x))
        n_buckets = baselines.n_buckets_for(h * w, self.chunk_size)
        rot_half = baselines.gaussian_rotations(xm.shape[-1], self.n_hashes, n_buckets, device=x.device,
                                                dtype=x.dtype)
        with torch.no_grad():
            codes = baselines.nlsn_hash(xm.detach(), rot_half)
        indices, undo_sort = baselines.sort_by_codes(codes, max(2 * rot_half.shape[-1], 1), stable=self.stable)
        ret, bucket_score = baselines._bucket_attention(xm, v, indices, undo_sort, self.n_hashes, self.chunk_size)
        y = baselines._combine_rounds(ret, bucket_score)
        return y.permute(0, 2, 1).reshape(n, c, h, w) * self.res_scale + x


def nlsn_style_network(model: nn.Module, stable: bool = False) -> nn.Module:
    """``model`` with every ``dlsn.models.NLSA`` replaced, in place, by an :class:`NLSNStyleNLSA` holding its
    weights (``stable=False``: the authors' unstable sort). Returns ``model``."""
    from dlsn.models import NLSA

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NLSA):
                swap = NLSNStyleNLSA(child.channels, child.reduction, child.chunk_size, child.n_hashes,
                                     child.res_scale, stable=stable)
                swap.load_state_dict(child.state_dict())
                setattr(parent, name, swap.to(next(child.parameters()).device))
    return model


def build_network(impl: str, preset: str, scale: int = 2, *, channels_last: bool = False, seed: int = 0,
                  device: str = "cpu") -> tuple[nn.Module, bool]:
    """``(model, bf16)``: the network of ``impl`` (weights drawn from ``seed``, so every impl gets the same
    ones) on ``device``, and whether ``impl`` runs it under bf16 autocast."""
    from dlsn.models import build_model

    base, bf16 = _split_impl(impl)
    if base in ("dlsn-style", "nlsn-style"):
        backend = "reference"  # never runs: every GLA / NLSA is swapped out below
    elif base.startswith("fused-"):
        backend = base[len("fused-"):]
    else:
        raise ValueError(f"unknown impl {impl!r}; use {', '.join(network_impls(('<backend>',)))}")
    torch.manual_seed(seed)
    model = build_model(preset, scale, backend=backend)
    if base == "dlsn-style":
        dlsn_style_network(model)
    elif base == "nlsn-style":
        nlsn_style_network(model)
        if not any(isinstance(m, NLSNStyleNLSA) for m in model.modules()):
            raise ValueError(f"unknown impl {impl!r} for preset {preset!r}: it swaps NLSA blocks, and this "
                             "network has none (use an nlsn preset)")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(torch.device(device), memory_format=fmt), bf16


@contextlib.contextmanager
def _autocast(device: torch.device, bf16: bool, train: bool = False) -> Iterator[None]:
    """bf16 autocast as the tools run it: inference as ``dlsn.models.precision.autocast`` (no weight cache),
    a train step as ``dlsn.train`` (torch's default cache: the cast weights are kept for the backward anyway)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=train):
        yield


def network_case(
    impl: str,
    preset: str,
    size: int,
    n: int = 1,
    train: bool = False,
    scale: int = 2,
    channels_last: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> Callable[[], None]:
    """A whole network's train step (``train``: forward, L1 loss, backward, no optimiser step) or one
    inference call (eval mode, no graph) on ``n x 3 x size x size`` images in ``[0, 255]``.

    ``channels_last``: model and input in ``torch.channels_last`` memory format.
    """
    dev = torch.device(device)
    model, bf16 = build_network(impl, preset, scale, channels_last=channels_last, seed=seed, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(seed)
    lr = (torch.rand(n, 3, size, size, generator=gen) * 255.0).to(dev).contiguous(memory_format=fmt)
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    if not train:
        model.eval()

        def run() -> None:
            with torch.no_grad(), _autocast(dev, bf16):
                model(lr)
            sync()

        return run

    model.train()
    hr = (torch.rand(n, 3, size * scale, size * scale, generator=gen) * 255.0).to(dev)

    def run_train() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(dev, bf16, train=True):
            sr: Tensor = model(lr)
        F.l1_loss(sr.float(), hr).backward()
        sync()

    return run_train


def estimate_network_bytes(impl: str, preset: str, size: int, n: int = 1, train: bool = False,
                           scale: int = 2) -> int:
    """Rough peak extra bytes, to skip a DLSN-style network that would not fit (good to ~2x).

    Feature maps: about 4 live ``[N, C, H, W]`` maps in inference, about 20 kept per group for the
    backward (12 in the LFFBs, the GLA's, the group conv), plus the upsampler's. DLSN-style adds its
    materialised attention (``bench.cases.estimate_core_bytes``): one block at a time in inference, every
    block's saved tensors in a train step.
    """
    from bench.cases import estimate_core_bytes
    from dlsn.models import preset_config

    config = preset_config(preset, scale)
    if config["arch"] == "nlsn":  # ResBlocks instead of groups; one attention block per 8 ResBlocks, plus one
        config["n_resgroups"] = 1 + config["n_resblocks"] // 8
    c, groups = config["n_feats"], config["n_resgroups"]
    k, r, reduction = config["chunk_size"], config["n_hashes"], config["reduction"]
    fmap = n * c * size * size * 4
    maps = (20 * groups + 8) * fmap if train else 4 * fmap
    maps += 2 * n * c * size * size * scale * scale * 4  # upsampler output and the last conv's input
    base, _ = _split_impl(impl)
    if base not in ("dlsn-style", "nlsn-style"):
        return maps
    core = estimate_core_bytes(base, n, size, size, c // reduction, c, k, r, backward=train)
    return maps + core * (groups if train else 1)


def measure_network(benchmark, config: BenchConfig, case: NetworkCase, impl: str, *,
                    channels_last: bool = False) -> None:
    """Times one case with pytest-benchmark here, then its peak extra memory in a child process.

    Heavy cases (``NetworkCase.heavy``) get one timed round with no warm-up, and the child measures its
    first call: each costs two calls, not seven. Skips a baseline that would not fit the memory limit.
    """
    base, bf16 = _split_impl(impl)
    skip_unless_backend_runs(base, config.device)
    if bf16 and torch.device(config.device).type == "cpu" and not _cpu_bf16_works():
        pytest.skip("torch.autocast('cpu', bfloat16) does not run here")
    kwargs = {"impl": impl, "preset": case.preset, "size": case.size, "n": case.n, "train": case.train,
              "scale": case.scale, "channels_last": channels_last}
    estimate = estimate_network_bytes(impl, case.preset, case.size, case.n, case.train, case.scale)
    skip_if_too_big(base, estimate, config)
    group = NLSN_GROUP if case.preset.startswith("nlsn") else GROUP
    measure(benchmark, config, "bench.cases:network_case", kwargs, group=group, impl=impl, label=case.label,
            pixels=case.size ** 2, estimate_bytes=estimate, heavy=case.heavy,
            extra_info={"channels_last": channels_last}, memory_timeout_s=1800.0)


def _cpu_bf16_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
    except RuntimeError:
        return False
    return True


def profile_split(impl: str, preset: str, size: int, n: int = 1, train: bool = False,
                  device: str = "cpu") -> dict[str, float]:
    """Seconds of one call (after a warm-up) by part, from ``torch.profiler``: ``attention`` (the dlsn ops,
    inclusive), ``convolutions`` (forward and backward, inclusive), ``rest``, ``total`` (self times summed)
    and ``cpu`` (this process's CPU time over the profiled call)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    run = network_case(impl, preset, size, n=n, train=train, device=device)
    run()
    cpu_start = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    cpu = time.process_time() - cpu_start
    events = {e.key: e for e in prof.key_averages()}

    def inclusive(*names: str) -> float:
        return sum(events[k].cpu_time_total for k in names if k in events) / 1e6

    attention = inclusive("dlsn::gla_attention", "dlsn::attention_backward")
    convolutions = inclusive("aten::convolution", "aten::convolution_backward")
    total = sum(e.self_cpu_time_total for e in events.values()) / 1e6
    return {"attention": attention, "convolutions": convolutions, "rest": total - attention - convolutions,
            "total": total, "cpu": cpu}


def output_psnr(out: Tensor, ref: Tensor, scale: int) -> tuple[float, float]:
    """(Y-PSNR, RGB PSNR) in dB of ``out`` against ``ref`` (both on the 0-255 scale): Y-PSNR as
    ``dlsn.metrics.psnr_y`` (8-bit rounding, ``scale`` border pixels shaved), RGB on the raw float outputs."""
    import math

    from dlsn.metrics import psnr_y

    y = psnr_y(out.float() / 255.0, ref.float() / 255.0, scale)
    mse = float((out.double() - ref.double()).pow(2).mean())
    rgb = 10.0 * math.log10(255.0**2 / mse) if mse > 0 else math.inf
    return float(y.min()), rgb


def side_by_side(case: NetworkCase, impls: list[str], rounds: int = 2, memory: bool = True,
                 memory_timeout_s: float = 1800.0) -> list[dict[str, float | str]]:
    """Every impl of ``case`` timed round-robin (round 1 of every impl, then round 2, ...) so that load
    changes hit them alike; wall and CPU time (``time.process_time``) per call, the best of the rounds.
    ``memory``: then each one's peak extra memory in a child process (its first call: no warm-up).
    Inference: each output's Y-PSNR / PSNR against the first impl's (the weights are the same).
    """
    import time

    from bench.memory import measure_peak

    runs = []
    for impl in impls:
        model, bf16 = build_network(impl, case.preset, case.scale)
        gen = torch.Generator().manual_seed(0)
        lr = torch.rand(case.n, 3, case.size, case.size, generator=gen) * 255.0
        model.train(case.train)
        runs.append((model, bf16, lr))
    hr = torch.rand(case.n, 3, case.size * case.scale, case.size * case.scale,
                    generator=torch.Generator().manual_seed(1)) * 255.0
    rows: list[dict[str, float | str]] = [{"impl": impl, "wall_s": float("inf"), "cpu_s": float("inf")}
                                          for impl in impls]
    outputs: list[Tensor | None] = [None] * len(impls)
    for _ in range(rounds):
        for i, (model, bf16, lr) in enumerate(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            if case.train:
                model.zero_grad(set_to_none=True)
                with _autocast(lr.device, bf16, train=True):
                    sr = model(lr)
                F.l1_loss(sr.float(), hr).backward()
            else:
                with torch.no_grad(), _autocast(lr.device, bf16):
                    outputs[i] = model(lr).float()
            rows[i]["wall_s"] = min(float(rows[i]["wall_s"]), time.perf_counter() - wall)
            rows[i]["cpu_s"] = min(float(rows[i]["cpu_s"]), time.process_time() - cpu)
    if not case.train and outputs[0] is not None:
        for row, out in zip(rows, outputs):
            assert out is not None
            row["y_psnr_db"], row["psnr_db"] = output_psnr(out, outputs[0], case.scale)
    del runs, outputs
    if memory:
        for row in rows:
            kwargs = {"impl": row["impl"], "preset": case.preset, "size": case.size, "n": case.n,
                      "train": case.train, "scale": case.scale}
            peak = measure_peak("bench.cases:network_case", kwargs, threads=torch.get_num_threads(),
                                warmup=False, timeout_s=memory_timeout_s)
            row["peak_extra_mb"] = peak.peak_extra_mb
    return rows


def _compare_main(argv: list[str]) -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m bench.network compare",
                                     description="Whole-network impls side by side: time, memory, accuracy.")
    parser.add_argument("preset")
    parser.add_argument("--size", type=int, nargs="+", default=[128])
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--impl", nargs="+", default=["fused-cpu", "fused-cpu-bf16", "dlsn-style"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    for size in args.size:
        case = NetworkCase(args.preset, size, args.n, args.train)
        rows = side_by_side(case, args.impl, rounds=args.rounds, memory=not args.no_memory)
        print(f"{case.label} (load average {os.getloadavg()[0]:.2f} at the end)")
        last = rows[-1]
        for row in rows:
            extra = "".join(f"  {k} {row[k]:.1f}" for k in ("peak_extra_mb", "y_psnr_db", "psnr_db") if k in row)
            print(f"  {row['impl']:<16} wall {row['wall_s']:8.2f} s  cpu {row['cpu_s']:8.2f} s  "
                  f"x{float(last['cpu_s']) / float(row['cpu_s']):.2f} (cpu vs {last['impl']}){extra}", flush=True)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        _compare_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description="Where one whole-network call goes (torch.profiler split); "
                                                 "'compare PRESET ...': impls side by side.")
    parser.add_argument("preset")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="a train step (default: one inference call)")
    parser.add_argument("--impl", default="fused-cpu", help="fused-<backend>[-bf16] or dlsn-style[-bf16]")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = profile_split(args.impl, args.preset, args.size, args.n, args.train)
    label = NetworkCase(args.preset, args.size, args.n, args.train).label
    print(f"{label} {args.impl}: CPU time {split['cpu']:.2f} s, profiled {split['total']:.2f} s")
    for part in ("attention", "convolutions", "rest"):
        print(f"  {part:<13}{split[part]:8.2f} s {100 * split[part] / split['total']:6.1f}%")


if __name__ == "__main__":
    main()
