"""CPU training-step time of a small EDSR-like network with one GLA block against the same network without it.

    python -m bench.step_time [--threads 2] [--steps 50] [--warmup 5] [--backend cpu] [--order interleaved]
    python -m bench.step_time --wait-policies default PASSIVE     # one table per OMP_WAIT_POLICY, each in a child

Both networks are built from the same seed: :class:`dlsn.models.EDSRGLA` (``n_resblocks`` residual blocks
with one GLA in the middle) and :class:`dlsn.models.PlainSR` (the same layout without the GLA). A step is
forward, L1 loss, backward and an Adam update on a random batch. ``--order interleaved`` alternates one step
of each network, so both see the same background load (a shared machine's load drifts over a run);
``sequential`` runs all steps of one network, then the other.

Prints per network the min / median / max step time and the spread ``max / min``, with the machine, the
thread count, the OpenMP settings and the load average before and after, so that a rerun on a quieter
machine can be compared with the first. The question it answers (issue 32, item 5): does the GLA block make
the step time erratic (a spread far above the network without it)?

What it found on a shared 2-core machine (load average 9-11, 2026-12-07): with libgomp's default wait policy
both networks were erratic (spread 5.2 with the block, 7.4 without; medians 5.4 s and 3.8 s), because
OpenMP threads spin at every barrier while the machine's other processes hold the cores; with
``OMP_WAIT_POLICY=PASSIVE`` both were steady (1.46 and 1.34; medians 0.67 s and 0.36 s). The wait policy is
read when the OpenMP runtime loads (with torch), hence a child process per policy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlsn.models import EDSRGLA, PlainSR

__all__ = ["build_pair", "main", "summarise", "time_steps"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def build_pair(n_feats: int, n_resblocks: int, chunk_size: int, n_hashes: int, backend: str | None,
               scale: int = 2) -> dict[str, nn.Module]:
    """The network with one GLA block and the one without, initialised from the same seed."""
    torch.manual_seed(0)
    with_gla = EDSRGLA(scale, n_feats=n_feats, n_resblocks=n_resblocks, chunk_size=chunk_size,
                       n_hashes=n_hashes, backend=backend)
    torch.manual_seed(0)
    without = PlainSR(scale, n_feats=n_feats, n_resblocks=n_resblocks)
    return {"with GLA": with_gla.train(), "without GLA": without.train()}


def _stepper(model: nn.Module, batch: int, patch: int, scale: int) -> Callable[[], float]:
    """One training step on a fixed random batch; returns its wall time in seconds."""
    generator = torch.Generator().manual_seed(1)
    lr = torch.rand(batch, 3, patch, patch, generator=generator) * 255
    hr = torch.rand(batch, 3, patch * scale, patch * scale, generator=generator) * 255
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(lr), hr)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def time_steps(steppers: dict[str, Callable[[], float]], steps: int, warmup: int,
               order: str = "interleaved") -> dict[str, list[float]]:
    """Step times (seconds) of each stepper after ``warmup`` untimed steps each."""
    for step in steppers.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    if order == "interleaved":
        for _ in range(steps):
            for name, step in steppers.items():
                times[name].append(step())
    elif order == "sequential":
        for name, step in steppers.items():
            times[name] = [step() for _ in range(steps)]
    else:
        raise ValueError(f"order must be 'interleaved' or 'sequential', got {order!r}")
    return times


def summarise(times: Sequence[float]) -> dict[str, float]:
    """min / median / max (seconds) and the spread max / min."""
    if not times:
        raise ValueError("no step times")
    low, high = min(times), max(times)
    return {"min": low, "median": statistics.median(times), "max": high, "spread": high / low}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m bench.step_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per network (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per network first (default 5)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    parser.add_argument("--patch", type=int, default=32, help="LR patch side (default 32: 1024 positions)")
    parser.add_argument("--feats", type=int, default=32, help="channels (default 32)")
    parser.add_argument("--resblocks", type=int, default=4, help="residual blocks (default 4)")
    parser.add_argument("--chunk-size", type=int, default=64, help="GLA chunk size (default 64: 16 buckets)")
    parser.add_argument("--n-hashes", type=int, default=3, help="GLA hash rounds (default 3)")
    parser.add_argument("--backend", default=None, help="GLA backend (default: automatic)")
    parser.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved")
    parser.add_argument("--only", choices=("with GLA", "without GLA"), default=None,
                        help="time one network only")
    parser.add_argument("--wait-policies", nargs="+", metavar="POLICY", default=None,
                        help="run the whole measurement once per OMP_WAIT_POLICY (default, ACTIVE, PASSIVE), "
                             "each in a fresh process, back to back")
    args = parser.parse_args(argv)
    if args.wait_policies:
        return _per_wait_policy(args.wait_policies, list(argv if argv is not None else sys.argv[1:]))

    torch.set_num_threads(args.threads)
    load_before = _load()
    nets = build_pair(args.feats, args.resblocks, args.chunk_size, args.n_hashes, args.backend)
    if args.only:
        nets = {args.only: nets[args.only]}
    steppers = {name: _stepper(net, args.batch, args.patch, 2) for name, net in nets.items()}
    times = time_steps(steppers, args.steps, args.warmup, args.order)
    load_after = _load()

    print(f"machine: {_cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"network: EDSR-like, {args.feats} channels, {args.resblocks} residual blocks, x2, batch {args.batch} "
          f"of {args.patch}x{args.patch}; GLA chunk {args.chunk_size}, R={args.n_hashes}, backend "
          f"{args.backend or 'automatic'}; {args.steps} steps after {args.warmup} warm-up, {args.order}")
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print(f"{'network':<12} {'min s':>8} {'median s':>9} {'max s':>8} {'max/min':>8}")
    table = {}
    for name, values in times.items():
        row = summarise(values)
        table[name] = row
        print(f"{name:<12} {row['min']:8.3f} {row['median']:9.3f} {row['max']:8.3f} {row['spread']:8.2f}")
    return table


def _per_wait_policy(policies: Sequence[str], argv: list[str]) -> dict[str, dict[str, float]]:
    """Reruns this command without ``--wait-policies`` in a child per policy ("default": unset)."""
    rest, skip = [], False
    for arg in argv:
        if arg == "--wait-policies":
            skip = True
        elif skip and arg.startswith("--"):
            skip = False
        if not skip:
            rest.append(arg)
    for policy in policies:
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy.lower() != "default":
            env["OMP_WAIT_POLICY"] = policy
        print(f"=== OMP_WAIT_POLICY={policy}", flush=True)
        subprocess.run([sys.executable, "-m", "bench.step_time", *rest], env=env, check=True)
    return {}


if __name__ == "__main__":
    main()
