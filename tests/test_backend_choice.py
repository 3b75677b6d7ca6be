"""The dispatcher (dlsn_kernels/_dispatch.py): per call the first backend of the device's order with no reasons,
explicit backends with their reasons, the check's per-user cache, the first-use probe, deterministic mode, and
what is read once per process. GPUs are simulated (device reasons, target and probe monkeypatched): no GPU needed.
"""

from __future__ import annotations

import logging

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _dispatch, _verify, targets
from dlsn_kernels.backends import BACKENDS, Inputs
from dlsn_kernels.check import record_check

CPU = torch.device("cpu")
GPU = torch.device("cuda:0")
CPU_REASON = dk.available_backends("cpu")["cpu"].reason
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")


def training(device: torch.device = GPU, dtype: torch.dtype = torch.bfloat16, **sizes: int) -> Inputs:
    shape = {"cm": 64, "cv": 256, "chunk_size": 128, "n": 16, "length": 2304, "rounds": 3} | sizes
    return Inputs(device, dtype, **shape)


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test starts as a new process would: its own cache folder, nothing read yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DLSN_BACKEND", raising=False)
    _dispatch.reset()
    yield
    _dispatch.reset()


@pytest.fixture
def gpu(monkeypatch):
    """An sm_90 GPU on which triton, cuda and flex all load; the first-use probe passes unless told otherwise.
    Returns the list of probed backends (a failing backend: put its name in ``gpu.failing``)."""

    class Probes(list):
        failing: set[str] = set()

    probes = Probes()
    real = {name: b.device_reasons for name, b in BACKENDS.items()}
    def loads_on_gpu(real):
        return lambda device: [] if device.type == "cuda" else real(device)

    for name in ("cuda", "triton", "flex"):
        monkeypatch.setattr(BACKENDS[name], "device_reasons", loads_on_gpu(real[name]))
    monkeypatch.setattr(targets, "target_of", lambda device: targets.target_for_arch("90"))
    monkeypatch.setattr(_dispatch, "cache_key", lambda device, dtype: f"H100 | sm_90 | {targets.precision_of(dtype)}")

    def probe(name, device, dtype):
        probes.append(name)
        return "wrong results: y 0.9" if name in probes.failing else None

    monkeypatch.setattr(_verify, "probe", probe)
    return probes


def test_a_case_beyond_a_backends_limits_falls_through_with_its_reasons(gpu):
    wide = training(cv=768)
    assert any("Cv = 768" in why for why in BACKENDS["triton"].not_supported_reasons(wide, "forward"))
    assert _dispatch.select(None, wide, needs_grad=True, op="gla_attention").name == "cuda"
    assert _dispatch.select(None, training(), needs_grad=True, op="gla_attention").name == "triton"
    with pytest.raises(dk.BackendUnavailableError, match=r"'triton' cannot run gla_attention.*Cv = 768"):
        _dispatch.select("triton", wide, needs_grad=False, op="gla_attention")


def test_nothing_fits_lists_every_backend_with_its_reasons(gpu):
    with pytest.raises(dk.BackendUnavailableError) as info:
        _dispatch.select(None, training(dtype=torch.float64), needs_grad=True, op="gla_attention")
    text = str(info.value)
    assert text.startswith("no backend can run gla_attention (forward and backward) automatically on cuda:0")
    assert "backend='reference'" in text
    for name in dk.BACKENDS:
        assert f"\n  {name}: " in text
    assert "triton takes float32, float16, bfloat16 on cuda, got float64" in text
    print(text)


def test_deterministic_mode_excludes_a_nondeterministic_backward(gpu):
    record_check(GPU, torch.bfloat16, {
        "flex": {"passed": True, "fwd_ms": 1.0, "step_ms": 2.0, "deterministic": False},
        "triton": {"passed": True, "fwd_ms": 1.5, "step_ms": 3.0, "deterministic": True},
        "cuda": {"passed": True, "fwd_ms": 4.0, "step_ms": 9.0, "deterministic": True}})
    before = torch.are_deterministic_algorithms_enabled()
    assert _dispatch.select(None, training(), needs_grad=True, op="gla_attention").name == "flex"
    try:
        torch.use_deterministic_algorithms(True)
        assert _dispatch.select(None, training(), needs_grad=True, op="gla_attention").name == "triton"
        # a forward without gradients has no atomics: flex stays the fastest
        assert _dispatch.select(None, training(), needs_grad=False, op="gla_attention").name == "flex"
        why = BACKENDS["flex"].not_supported_reasons(training(), "backward")
        assert any("use_deterministic_algorithms" in w for w in why)
    finally:
        torch.use_deterministic_algorithms(before)


def test_a_backend_that_failed_the_probe_is_never_chosen_again(gpu):
    gpu.failing = {"triton"}
    warning = r"triton backend failed its first-use probe.*python -m dlsn_kernels\.check"
    with pytest.warns(RuntimeWarning, match=warning):
        assert _dispatch.select(None, training(), needs_grad=True, op="gla_attention").name == "cuda"
    gpu.failing = set()  # even if it would pass now: set aside for the process
    for grad in (False, True):
        assert _dispatch.select(None, training(), needs_grad=grad, op="gla_attention").name == "cuda"
    _dispatch._ORDERS.clear()  # a new dtype or precision asks again: the probe result is remembered
    assert _dispatch.select(None, training(), needs_grad=True, op="gla_attention").name == "cuda"
    assert gpu.count("triton") == 1
    assert _dispatch.automatic_order(str(GPU), torch.bfloat16, True)[1] == "first-use probe"


def test_the_check_cache_orders_by_speed_and_never_picks_a_failure(gpu):
    record_check(GPU, torch.bfloat16, {
        "triton": {"passed": False, "fwd_ms": 0.5, "step_ms": 1.0, "error": "wrong results"},
        "cuda": {"passed": True, "fwd_ms": 2.0, "step_ms": 5.0},
        "flex": {"passed": True, "fwd_ms": 1.0, "step_ms": 6.0}})
    assert _dispatch.select(None, training(), needs_grad=False, op="gla_attention").name == "flex"
    assert _dispatch.select(None, training(), needs_grad=True, op="gla_attention").name == "cuda"
    order, source = _dispatch.automatic_order(str(GPU), torch.bfloat16, True)
    assert "triton" not in order and source.startswith("checked on ") and source.endswith("by dlsn_kernels.check")
    assert gpu == []  # a cached result: no probe


@needs_cpu
def test_cpu_cache_is_read_once_and_named_as_the_source():
    assert dk.available_backends("cpu")["cpu"].automatic.endswith(": static order")
    assert dk.backend_summary("cpu") == "forward cpu, backward cpu (static order)"
    xm, v, lss = (torch.randn(1, 8, c) for c in (4, 4, 4))
    perm = torch.arange(8).reshape(1, 1, 8)
    dk.chunk_attention(xm, v, lss, perm, 4)  # the first automatic call reads the (absent) cache
    record_check(CPU, torch.float32, {"cpu": {"passed": False, "fwd_ms": 1.0, "step_ms": 2.0}})
    dk.chunk_attention(xm, v, lss, perm, 4)  # read once per process: the new file is not seen
    _dispatch.reset()
    with pytest.raises(dk.BackendUnavailableError, match="no backend can run chunk_attention"):
        dk.chunk_attention(xm, v, lss, perm, 4)  # it failed the check here: never picked
    dk.chunk_attention(xm, v, lss, perm, 4, backend="cpu")  # but it can still be asked for
    record_check(CPU, torch.float32, {"cpu": {"passed": True, "fwd_ms": 1.0, "step_ms": 2.0}})
    _dispatch.reset()
    status = dk.available_backends("cpu")["cpu"]
    assert "automatic forward and backward for ieee: checked on " in status.automatic
    assert status.automatic.endswith("by dlsn_kernels.check")


@needs_cpu
def test_environment_variable_is_read_once_per_process(monkeypatch):
    xm, v, lss = (torch.randn(1, 8, c) for c in (4, 4, 4))
    rot = dk.random_rotations(4, 1, 2)
    monkeypatch.setenv("DLSN_BACKEND", "cuda")
    dk.gla_attention(xm, v, lss, rot, 4)  # read at reset/import, not per call
    _dispatch.reset()
    with pytest.raises(dk.BackendUnavailableError, match="'cuda'"):
        dk.gla_attention(xm, v, lss, rot, 4)
    monkeypatch.setenv("DLSN_BACKEND", "no-such")
    _dispatch.reset()
    with pytest.raises(ValueError, match="unknown backend 'no-such'"):
        dk.gla_attention(xm, v, lss, rot, 4)


@needs_cpu
def test_the_automatic_choice_is_logged_once_per_device_and_dtype(caplog):
    xm, v, lss = (torch.randn(1, 8, c) for c in (4, 4, 4))
    rot = dk.random_rotations(4, 1, 2)
    with caplog.at_level(logging.INFO, logger="dlsn_kernels"):
        for _ in range(3):
            dk.gla_attention(xm, v, lss, rot, 4)
        dk.gla_attention(xm.double(), v.double(), lss.double(), rot.double(), 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "dlsn_kernels"]
    said = "forward cpu, backward cpu (static order)"
    assert lines == [f"dlsn_kernels: automatic backend on cpu for torch.float32: {said}",
                     f"dlsn_kernels: automatic backend on cpu for torch.float64: {said}"]


def test_mixed_forward_backward_names_are_gone():
    with pytest.raises(ValueError, match="unknown backend 'flex:cpu'"):
        _dispatch.requested("flex:cpu")
