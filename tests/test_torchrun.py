"""A restartable torchrun run: one of two gloo ranks is killed mid-run, torchrun restarts both, and
``--resume`` (no PATH) continues from ``last.pt``, losing at most ``--save-every`` steps."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dlsn.models.checkpoint import load_checkpoint
from tests.test_train import TINY, hr_folder, subprocess_env  # noqa: F401 (hr_folder is a fixture)

SAVE_EVERY = 4
MAX_STEPS = 40  # enough steps after the first save for the kill to land mid-run on a fast machine


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _saved_step(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except Exception:  # not there yet, or being replaced at this moment
        return -1


def test_killed_rank_restarts_from_last_pt(hr_folder, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
               "--max-restarts=1", "-m", "dlsn.train", "--data", str(hr_folder), "--max-steps", str(MAX_STEPS),
               "--save-every", str(SAVE_EVERY), "--val-every", "0", "--time-limit", "0", "--resume",
               "--out", str(out), *TINY]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        saved = -1
        while saved < SAVE_EVERY and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            saved = _saved_step(out / "last.pt")
        assert SAVE_EVERY <= saved < MAX_STEPS, f"no mid-run last.pt (step {saved})"
        victims = [pid for pid in _children(process.pid) if _rank_of(pid) == 1]
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        output, _ = process.communicate(timeout=max(10.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-4000:]
    resumed = [int(step) for step in re.findall(r"resumed at step (\d+)", output)]
    assert len(resumed) == 1, output[-4000:]
    # the run was at step >= saved when rank 1 died, and it continued from a save at or after that one
    assert resumed[0] >= saved and resumed[0] % SAVE_EVERY == 0
    assert "no last.pt in" in output  # the first start of the same command began the run
    final = load_checkpoint(out / "last.pt")
    assert final["step"] == MAX_STEPS and final["extra"]["world_size"] == 2
    assert output.count("held-out Y-PSNR") == 1


def _rank_main(rank: int, init_file: str, results: dict) -> None:
    """One gloo rank: rank 0's work fails (as a diverged validation does); record what each rank raised."""
    import torch
    import torch.distributed as dist

    from dlsn.errors import DivergedError, RunFailed
    from dlsn.training.processes import Processes, on_main

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    procs = Processes(rank, 2, rank)

    def work() -> None:
        raise DivergedError("training diverged at step 8: the validation PSNR is nan")

    start = time.perf_counter()
    try:
        on_main(procs, torch.device("cpu"), work)
        results[rank] = ("returned", time.perf_counter() - start)
    except RunFailed as exc:
        results[rank] = (type(exc).__name__ + ": " + str(exc), time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def test_a_failure_on_rank_0_stops_every_rank_at_once(tmp_path):
    """Rank 0 validates and saves alone; when that fails the other ranks raise at once instead of waiting at a
    barrier until the process group's timeout (they used to hang there)."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0][0].startswith("DivergedError: training diverged")
    assert results[1][0].startswith("RunFailed: rank 1: rank 0 stopped the run")
    assert results[1][1] < 30  # not the 60 s timeout
