"""Invalid-input fuzz: bad shapes, dtypes, devices, layouts, index values and non-tensors, on every
public op and backend that runs here and on the raw ``torch.ops.dlsn`` CPU ops.

Every case must raise a Python exception: never crash the process, never return. The cases run in a
worker process (tests/invalid_inputs.py) that reports each verdict as it goes; if it dies, the case
it was running is recorded as a crash and a new worker resumes after it. The cases and their sizes
come from a fixed seed (a random one with HYPOTHESIS_RANDOM=1, as for the property tests).
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlsn_kernels as dk
from tests import invalid_inputs

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # 744 fuzz cases in worker processes

BACKENDS_HERE = [name for name, why in dk.available_backends("cpu").items() if why.usable]
PUBLIC_ERRORS = ("ValueError", "TypeError", "BackendUnavailableError")


def _seed() -> int:
    return random.randrange(2**31) if os.environ.get("HYPOTHESIS_RANDOM") == "1" else 0


def _run_all(cases: list[dict], path: Path) -> dict[int, dict]:
    """Verdict of every case; a worker that dies marks its current case as a crash and is restarted."""
    path.write_text(json.dumps(cases))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors
    verdicts: dict[int, dict] = {}
    start = 0
    while start < len(cases):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.invalid_inputs", str(path), str(start)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        running = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if record.pop("started", False):
                running = record["i"]
            else:
                verdicts[record.pop("i")] = record
                running = None
        if proc.returncode == 0 and running is None:
            break
        crashed = running if running is not None else start
        verdicts[crashed] = {"outcome": "crashed", "exit": proc.returncode, "stderr": proc.stderr[-2000:]}
        start = crashed + 1
    return verdicts


def test_every_invalid_input_raises_a_python_exception(tmp_path):
    seed = _seed()
    cases = invalid_inputs.build_cases(seed, BACKENDS_HERE)
    verdicts = _run_all(cases, tmp_path / "cases.json")
    assert sorted(verdicts) == list(range(len(cases)))

    def describe(i: int) -> str:
        c = cases[i]
        return f"{c['api']}/{c['backend']} {c['op']} [{c['fault']}] sizes={c['sizes']} seed={c['seed']}: {verdicts[i]}"

    crashed = [describe(i) for i, v in verdicts.items() if v["outcome"] == "crashed"]
    returned = [describe(i) for i, v in verdicts.items() if v["outcome"] == "returned"]
    # The public API answers bad arguments with the errors its docstrings promise.
    untyped = [describe(i) for i, v in verdicts.items()
               if v["outcome"] == "raised" and cases[i]["api"] == "public" and v["type"] not in PUBLIC_ERRORS]
    # A bad perm or code is a ValueError naming the argument and the first bad entry, on every path.
    index_faults = [i for i, c in enumerate(cases) if c["fault"] in invalid_inputs.INDEX_FAULTS]
    unlocated = [describe(i) for i in index_faults
                 if verdicts[i].get("type") != "ValueError" or "[n=" not in verdicts[i].get("message", "")]
    tally = collections.Counter(v["outcome"] for v in verdicts.values())
    summary = f"seed {seed}: {len(cases)} cases ({len(index_faults)} index-value faults), {dict(tally)}"
    assert not crashed, summary + "\ncrashed:\n" + "\n".join(crashed)
    assert not returned, summary + "\nreturned without an error:\n" + "\n".join(returned)
    assert not untyped, summary + "\nunexpected exception type:\n" + "\n".join(untyped)
    assert not unlocated, summary + "\nindex fault without a located ValueError:\n" + "\n".join(unlocated)
    assert tally["raised"] == len(cases) >= 300


def test_a_crashing_case_is_pinned_and_the_rest_still_run(tmp_path):
    sizes = {"n": 1, "length": 5, "chunk": 2, "cm": 2, "cv": 2, "rounds": 1}
    case = {"api": "public", "backend": "reference", "op": "chunk_attention", "sizes": sizes, "seed": 0}
    faults = ["perm all zeros", invalid_inputs.SELF_TEST_CRASH, "perm value -1"]
    verdicts = _run_all([{**case, "fault": fault} for fault in faults], tmp_path / "cases.json")
    assert [verdicts[i]["outcome"] for i in range(3)] == ["raised", "crashed", "raised"]
    assert verdicts[1]["exit"] == -11  # SIGSEGV


@pytest.mark.parametrize("fault", ["perm value 2**40", "perm int32 repeat", "codes value -1"])
def test_the_fuzz_cases_are_faults_of_what_they_say(fault):
    """The generator spoils the argument it names (a fault that did nothing would pass as 'raised')."""
    target, mutate = invalid_inputs.FAULTS[fault]
    op = "chunk_attention" if target == "perm" else "bucket_sort"
    args = invalid_inputs.valid_arguments(op, {"n": 2, "length": 9, "chunk": 4, "cm": 3, "cv": 3, "rounds": 2}, 0)
    before = args[target].clone()
    mutate(args)
    assert not torch.equal(args[target].long(), before)
