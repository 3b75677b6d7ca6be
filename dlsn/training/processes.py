"""Processes, devices, CPU threads and signals of a training run (torchrun, ``--threads``, Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dlsn.cli import pick_device
from dlsn.errors import RunFailed


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_processes(device_arg: str | None) -> tuple[Processes, torch.device]:
    """Joins the torchrun process group (if launched by torchrun) and picks the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    procs = Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_arg)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", procs.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if procs.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=_round_store(restart, procs), rank=procs.rank,
                                    world_size=world)
    return procs, device


def _round_store(restart: str, procs: Processes) -> dist.Store:
    """torchrun's store under a prefix of its own for each restart. torchrun keeps one store across
    restarts, and without the prefix the restarted processes read the addresses the processes of the
    failed round left there (gloo then fails with "connection refused")."""
    import datetime

    # With the agent's store (torchrun's default) every process is a client; otherwise rank 0 serves it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), procs.world,
                          is_master=procs.main and not agent_store, timeout=datetime.timedelta(minutes=10))
    return dist.PrefixStore(f"dlsn/restart{restart}/", store)



def cpu_thread_budget(procs: Processes) -> int:
    """The cores this process may use: those it can run on, shared among torchrun's local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(procs.world)))
    return max(1, cores // local_world)


class ThreadTuner:
    """Chooses torch's intra-op thread count on the CPU by measured step time.

    On a machine shared with other processes, using every core can be many times slower than using
    fewer: when another process holds a core, each parallel op waits for the thread that is not
    running. The tuner times a few steps with each count, keeps the fastest, and measures again later, less often
    while the choice stands.
    """

    def __init__(self, options: Sequence[int], probe_steps: int = 3, recheck_s: float = 20.0,
                 max_recheck_s: float = 320.0) -> None:
        self.options = list(dict.fromkeys(options))
        self.probe_steps, self.recheck_s, self.max_recheck_s = probe_steps, recheck_s, max_recheck_s
        self.interval = recheck_s
        self.best = self.options[0]
        self.queue = list(self.options)
        self.times: dict[int, float] = {}
        self.samples: list[float] = []
        self.probing = True
        self.next_check = 0.0
        self._use(self.queue.pop(0))

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def _use(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.samples = []

    def after_step(self, seconds: float, now: float | None = None) -> None:
        """Call after every training step with its duration."""
        now = time.monotonic() if now is None else now
        if len(self.options) < 2:
            return
        if not self.probing:
            if now >= self.next_check:  # measure again: the other counts first, then the best
                self.queue = [t for t in self.options if t != self.best] + [self.best]
                self.probing = True
                self._use(self.queue.pop(0))
            return
        self.samples.append(seconds)
        if len(self.samples) <= self.probe_steps:  # the first step after a switch is a warm-up
            return
        self.times[self.threads] = sorted(self.samples[1:])[len(self.samples[1:]) // 2]
        if self.queue:
            self._use(self.queue.pop(0))
            return
        best = min(self.times, key=self.times.__getitem__)
        self.interval = min(self.interval * 2, self.max_recheck_s) if best == self.best else self.recheck_s
        self.best = best
        self._use(best)
        self.probing = False
        self.next_check = now + self.interval


def on_main(procs: Processes, device: torch.device, work: Callable[[], Any]) -> Any:
    """Runs ``work`` on rank 0 while the other ranks wait, then returns its result there (None elsewhere).

    A failure on rank 0 (a diverged validation score, a full disk) stops every rank at once: the ranks agree on
    one flag instead of meeting at a barrier that rank 0 never reaches, where they would hang until the process
    group's timeout (30 minutes by default). The others raise :class:`RunFailed` pointing at rank 0's message.
    """
    result, error = None, None
    if procs.main:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = exc
    if procs.distributed:
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag)
        if error is None and float(flag[0]) > 0:
            raise RunFailed(f"rank {procs.rank}: rank 0 stopped the run (its error is printed above)")
    if error is not None:
        raise error
    return result


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no interruption
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
