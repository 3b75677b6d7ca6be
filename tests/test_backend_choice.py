"""The automatic backend per pass (dlsn_kernels/_backend_choice.py): the measured table, its fallback, the
deterministic mode, and a forward from one backend with the backward of another (reference / cpu / flex)."""

from __future__ import annotations

import json

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _backend_choice as bc
from dlsn_kernels import reference as ref
from dlsn_kernels._ops import resolve_backend
from tests.helpers import CASES, make_inputs, rel_err, tolerance

CPU_REASON = dk.available_backends("cpu")["cpu"].reason
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")
CPU = torch.device("cpu")


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Writes a choice table for CPU tensors (capability "cpu") and points dlsn_kernels at it."""
    path = tmp_path / "backend_choice.json"
    monkeypatch.setenv("DLSN_BACKEND_CHOICE", str(path))
    monkeypatch.delenv("DLSN_BACKEND", raising=False)

    def write(choices: dict[str, str], deterministic: dict[str, dict[str, bool]] | None = None) -> None:
        bc.write_table(path, {key: {"backend": name} for key, name in choices.items()}, deterministic or {},
                       gpu="test GPU", date=__import__("datetime").date(2026, 1, 2))

    return write


@pytest.fixture
def no_table(tmp_path, monkeypatch):
    monkeypatch.setenv("DLSN_BACKEND_CHOICE", str(tmp_path / "missing.json"))
    monkeypatch.delenv("DLSN_BACKEND", raising=False)


def test_unmeasured_falls_back_to_the_order(no_table):
    choice = bc.choose(torch.device("cuda"), torch.bfloat16, ("triton", "cuda"), {"triton", "cuda", "flex"},
                       deterministic=False)
    assert (choice.forward, choice.backward) == ("triton", "triton")
    assert choice.source == "unmeasured default (order triton, cuda)" and choice.deterministic
    assert bc.choose(CPU, torch.float32, ("cpu",), {"reference"}) is None


@needs_cpu
def test_unmeasured_cpu_is_the_cpu_backend_and_says_so(no_table):
    assert resolve_backend(None, CPU, torch.float32).name == "cpu"
    status = dk.available_backends("cpu")["cpu"]
    assert status.automatic == "automatic forward and backward for fp32-highest: unmeasured default (order cpu)"
    assert status.deterministic_backward is True
    assert "automatic" not in str(dk.available_backends("cpu")["flex"])


@needs_cpu
def test_measured_table_picks_per_pass(table):
    table({"cpu/fp32-highest/fwd": "flex", "cpu/fp32-highest/bwd": "cpu"})
    chosen = resolve_backend(None, CPU, torch.float32)
    assert chosen.name == "flex:cpu"
    statuses = dk.available_backends("cpu")
    assert statuses["flex"].automatic.startswith("automatic forward for fp32-highest: measured on 2026-01-02 "
                                                 "(test GPU")
    assert statuses["cpu"].automatic.startswith("automatic backward for fp32-highest: measured on 2026-01-02")
    # float64 was never measured: the fallback, for both passes
    assert resolve_backend(None, CPU, torch.float64).name == "cpu"
    # an explicit backend still wins over the table
    assert resolve_backend("reference", CPU, torch.float32).name == "reference"


@needs_cpu
def test_automatic_mixed_choice_runs_forward_and_backward(table):
    table({"cpu/fp64/fwd": "flex", "cpu/fp64/bwd": "cpu"})
    case = CASES[5]
    xm, v, lss, rot, perm = make_inputs(case, requires_grad=True)
    y = dk.gla_attention(xm, v, lss, rot, case.chunk)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (xm, v, lss), grad)
    want_y = ref.gla_attention(xm, v, lss, rot, case.chunk)
    want = torch.autograd.grad(want_y, (xm, v, lss), grad)
    assert rel_err(y, want_y) < tolerance(torch.float64)
    assert all(rel_err(a, b) < tolerance(torch.float64, grad=True) for a, b in zip(got, want))


def test_table_naming_an_unusable_backend_falls_back(table):
    table({"cpu/fp32-highest/fwd": "triton", "cpu/fp32-highest/bwd": "cuda"})
    choice = bc.choose(CPU, torch.float32, ("cpu",), {"reference", "cpu", "flex"}, deterministic=False)
    assert (choice.forward, choice.backward) == ("cpu", "cpu")
    assert choice.source.startswith("unmeasured default")


def test_deterministic_mode_never_picks_a_nondeterministic_backward(table):
    usable = {"triton", "cuda", "flex"}
    gpu = "sm_90"
    entries = {f"{gpu}/bf16/fwd": {"backend": "flex"}, f"{gpu}/bf16/bwd": {"backend": "flex"}}
    tables = [
        {"date": "d", "gpu": "g", "choices": entries, "deterministic": {}},  # presumed: flex atomics
        {"date": "d", "gpu": "g", "choices": entries, "deterministic": {f"{gpu}/bf16": {"flex": False}}},
        {"date": "d", "gpu": "g", "choices": {**entries, f"{gpu}/bf16/bwd-deterministic": {"backend": "cuda"}},
         "deterministic": {f"{gpu}/bf16": {"flex": False, "cuda": True, "triton": True}}},
    ]
    device = torch.device("cuda")
    for number, measured in enumerate(tables):
        with_monkey = pytest.MonkeyPatch()
        with_monkey.setattr(bc, "capability", lambda _device: gpu)
        try:
            free = bc.choose(device, torch.bfloat16, ("triton", "cuda"), usable, deterministic=False, table=measured)
            strict = bc.choose(device, torch.bfloat16, ("triton", "cuda"), usable, deterministic=True, table=measured)
        finally:
            with_monkey.undo()
        assert (free.forward, free.backward) == ("flex", "flex") and not free.deterministic
        assert strict.forward == "flex"  # the forward has no atomics: it stays the fastest
        assert strict.backward == ("cuda" if number == 2 else "triton") and strict.deterministic


def test_deterministic_mode_is_read_from_torch(table, monkeypatch):
    monkeypatch.setattr(bc, "capability", lambda _device: "sm_90")
    measured = {"date": "d", "gpu": "g", "choices": {"sm_90/bf16/bwd": {"backend": "flex"}}, "deterministic": {}}
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        choice = bc.choose(torch.device("cuda"), torch.bfloat16, ("triton",), {"triton", "flex"}, table=measured)
    finally:
        torch.use_deterministic_algorithms(before)
    assert choice.backward == "triton"


def test_measured_determinism_overrides_the_presumption():
    measured = {"deterministic": {"sm_90/bf16": {"flex": True, "triton": False}}}
    assert bc.is_deterministic("flex", "sm_90", "bf16", measured)
    assert not bc.is_deterministic("triton", "sm_90", "bf16", measured)
    assert not bc.is_deterministic("flex", "sm_90", "fp32-high", measured)  # not measured there: presumed
    assert bc.is_deterministic("cuda", "sm_90", "fp32-high", None)


def test_precision_keys():
    before = torch.get_float32_matmul_precision()
    try:
        assert bc.precision_key(torch.bfloat16) == "bf16" and bc.precision_key(torch.float16) == "fp16"
        assert bc.precision_key(torch.float64) == "fp64"
        for setting, key in (("highest", "fp32-highest"), ("high", "fp32-high"), ("medium", "fp32-high")):
            torch.set_float32_matmul_precision(setting)
            assert bc.precision_key(torch.float32) == key and bc.precision_key(None) == key
    finally:
        torch.set_float32_matmul_precision(before)
    assert bc.capability(CPU) == "cpu"


def test_table_round_trip_and_broken_table(tmp_path):
    path = tmp_path / "t.json"
    written = bc.write_table(path, {"sm_90/bf16/fwd": {"backend": "flex"}}, {"sm_90/bf16": {"flex": False}}, "H200")
    assert bc.load_table(path) == written == json.loads(path.read_text())
    assert bc.load_table(tmp_path / "none.json") is None
    path.write_text('{"gpu": "H200"}')
    with pytest.raises(ValueError, match="not a backend choice table"):
        bc.load_table(path)


def test_choices_from_session():
    fwd = {"bf16": {"triton": 0.5, "cuda": 0.6, "flex": 0.4}, "fp32-high": {"triton": 1.0, "cuda": 1.2, "flex": 0.9}}
    step = {"bf16": {"triton": 1.5, "cuda": 1.7, "flex": 1.6}, "fp32-high": {"triton": 3.0, "cuda": 2.0, "flex": 2.5}}
    passed = {"bf16": {"triton", "cuda", "flex"}, "fp32-high": {"triton", "cuda"}}  # flex failed fp32-high
    repeatable = {"sm_90/bf16": {"triton": True, "cuda": True, "flex": False},
                  "sm_90/fp32-high": {"triton": True, "cuda": True}}
    entries = bc.choices_from_session(fwd, step, passed, repeatable, "sm_90")
    assert entries["sm_90/bf16/fwd"]["backend"] == "flex"
    # after a flex forward: flex 1.6; triton 0.4 + 1.0 = 1.4; cuda 0.4 + 1.1 = 1.5
    assert entries["sm_90/bf16/bwd"]["backend"] == "triton"
    assert entries["sm_90/bf16/bwd"]["step_ms"] == {"triton": 1.4, "cuda": 1.5, "flex": 1.6}
    assert entries["sm_90/bf16/bwd-deterministic"]["ranking"] == ["triton", "cuda"]
    assert entries["sm_90/fp32-high/fwd"]["backend"] == "triton"  # flex did not pass there
    assert entries["sm_90/fp32-high/bwd"]["backend"] == "cuda"  # 1.0 + 2.0 - 1.2 = 1.8 < 3.0
    flex_wins = bc.choices_from_session({"bf16": {"triton": 0.5, "flex": 0.4}}, {"bf16": {"triton": 2.0, "flex": 1.0}},
                                        {"bf16": {"triton", "flex"}}, {"sm_90/bf16": {"triton": True}}, "sm_90")
    assert flex_wins["sm_90/bf16/bwd"]["backend"] == "flex"  # flex's own step, 1.0 < 0.4 + 1.5
    assert flex_wins["sm_90/bf16/bwd-deterministic"]["backend"] == "triton"


# ----------------------------------------------------------------------------------------------
# A forward from one backend with the backward of another gives the results of either alone.

PAIRS = ["reference:cpu", "cpu:reference", "flex:cpu", "flex:reference", "reference:reference"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=str)
def test_mixed_backends_match_either_alone(case, pair, dtype):
    if "cpu" in pair and CPU_REASON is not None:
        pytest.skip(f"cpu backend unavailable: {CPU_REASON}")
    xm, v, lss, rot, perm = (t.to(dtype) if t.is_floating_point() else t for t in make_inputs(case))
    leaves = [t.detach().requires_grad_(True) for t in (xm, v, lss)]
    exact = [t.detach().double().requires_grad_(True) for t in (xm, v, lss)]
    gen = torch.Generator().manual_seed(7)

    # gla_attention: y and the three gradients
    y = dk.gla_attention(*leaves, rot, case.chunk, backend=pair)
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, grad.to(dtype))
    want_y = ref.gla_attention(*exact, rot.double(), case.chunk)
    want = torch.autograd.grad(want_y, exact, grad)
    assert rel_err(y, want_y) < tolerance(dtype)
    for a, b in zip(got, want):
        assert rel_err(a, b) < tolerance(dtype, grad=True)

    # chunk_attention with a loss on the lse too (the delta of the common backward)
    out, lse = dk.chunk_attention(*leaves, perm, case.chunk, backend=pair)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out, lse), leaves, (g_out.to(dtype), g_lse.to(lse.dtype)))
    want_out, want_lse = ref.chunk_attention(*exact, perm, case.chunk)
    want = torch.autograd.grad((want_out, want_lse), exact, (g_out, g_lse))
    assert rel_err(out, want_out) < tolerance(dtype) and rel_err(lse, want_lse) < tolerance(dtype)
    for a, b in zip(got, want):
        assert rel_err(a, b) < tolerance(dtype, grad=True)


@needs_cpu
def test_flex_backward_after_a_cpu_forward_raises_on_cpu():
    case = CASES[3]
    xm, v, lss, rot, _ = make_inputs(case, requires_grad=True)
    y = dk.gla_attention(xm, v, lss, rot, case.chunk, backend="cpu:flex")
    with pytest.raises(dk.BackendUnavailableError, match="backend='cpu'"):
        y.sum().backward()


@needs_cpu
def test_env_variable_takes_a_pair(monkeypatch):
    monkeypatch.setenv("DLSN_BACKEND", "flex:cpu")
    assert resolve_backend(None, CPU, torch.float32).name == "flex:cpu"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resolve_backend("flex:fast", CPU)


def test_a_forward_only_backend_can_win_the_forward():
    entries = bc.choices_from_session({"fp32-highest": {"cpu": 2.0, "flex": 1.0}}, {"fp32-highest": {"cpu": 5.0}},
                                      {"fp32-highest": {"cpu", "flex"}}, {}, "cpu")
    assert entries["cpu/fp32-highest/fwd"]["backend"] == "flex"
    assert entries["cpu/fp32-highest/bwd"]["backend"] == "cpu"
    assert entries["cpu/fp32-highest/bwd"]["step_ms"] == {"cpu": 4.0}  # 1.0 (flex forward) + 5.0 - 2.0
    assert "cpu/fp32-highest/bwd-deterministic" not in entries  # nothing was measured repeatable
