"""What each backend says about a device (``Backend.device_reasons``, ``available_backends``): the GPU backends are
reported unavailable, with the reason, wherever no GPU can run them (issue 13), and a ROCm build of torch reaches
the triton backend on CUDA-type tensors while the cuda backend says it needs an NVIDIA build (issue 30)."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _dispatch, _ops, _verify, targets
from dlsn_kernels.backends import BACKENDS, Inputs


@pytest.fixture(autouse=True)
def fresh_dispatch():
    _dispatch.reset()
    yield
    _dispatch.reset()


def _reasons(device: str) -> dict[str, str | None]:
    return {name: status.reason for name, status in dk.available_backends(device).items()}


NO_GPU = "no GPU is visible"


def test_this_machine_reports_the_truth_for_cuda_tensors():
    reasons = _reasons("cuda")
    assert reasons["reference"] is None
    if torch.version.cuda is None and not torch.version.hip:
        for name in ("cuda", "triton"):
            assert "has no CUDA or ROCm support" in reasons[name]
    elif not torch.cuda.is_available():
        assert reasons["cuda"] == reasons["triton"] == f"{NO_GPU} (torch.cuda.is_available() is False)"
    else:  # a GPU machine: whatever else may be missing, it is not the GPU
        for name in ("cuda", "triton"):
            assert reasons[name] is None or NO_GPU not in reasons[name]


def test_no_visible_gpu_makes_both_gpu_backends_unavailable(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = _reasons("cuda:0")
    assert NO_GPU in reasons["cuda"] and NO_GPU in reasons["triton"]
    assert reasons["reference"] is None
    assert reasons["cpu"] is not None  # CPU kernels never take CUDA tensors


def test_cpu_only_torch_build_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    reasons = _reasons("cuda")
    for name in ("cuda", "triton"):
        assert "has no CUDA or ROCm support" in reasons[name] and torch.__version__ in reasons[name]


def test_missing_device_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    reasons = _reasons("cuda:3")
    assert reasons["cuda"] == reasons["triton"] == "CUDA device 3 does not exist (1 visible)"


def test_cpu_tensors_are_unaffected_by_the_gpu_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = _reasons("cpu")
    assert reasons["cuda"] == "the cuda backend takes cuda tensors, got cpu"
    assert NO_GPU not in (reasons["triton"] or "")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*reference, cpu, cuda, triton, flex"):
        _dispatch.requested("tpu")


def test_every_backend_declares_what_it_supports():
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.dtypes and isinstance(backend.deterministic_backward, bool)
        assert set(backend.backward_on) <= set(backend.dtypes)
    assert not BACKENDS["flex"].deterministic_backward  # atomic adds into the captured lss
    assert BACKENDS["flex"].passes(torch.device("cpu")).startswith("forward only")


def test_available_backends_prints_as_a_table():
    text = str(dk.available_backends("cpu"))
    header, *rows = text.splitlines()
    assert header.split()[:3] == ["backend", "runs", "here"]
    assert [row.split()[0] for row in rows] == list(dk.BACKENDS)
    assert repr(dk.available_backends("cpu")) == text  # a REPL shows the table too


# ----------------------------------------------------------------------------------------------
# ROCm (issue 30): torch.version.hip set, torch.version.cuda None, one AMD GPU visible.


@pytest.fixture
def rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(targets, "target_of", lambda device: targets.target_for_arch("gfx942"))
    monkeypatch.setattr(_ops, "triton_error", lambda: None)  # Triton's AMD backend imports
    probed = []
    monkeypatch.setattr(_verify, "probe", lambda name, device, dtype: probed.append(name))  # passes
    return probed


def test_rocm_reaches_triton_and_the_cuda_backend_says_it_needs_nvidia(rocm):
    reasons = _reasons("cuda:0")
    assert reasons["triton"] is None and reasons["reference"] is None
    assert "needs an NVIDIA (CUDA) build of torch" in reasons["cuda"] and "ROCm" in reasons["cuda"]
    inputs = Inputs(torch.device("cuda:0"), torch.bfloat16, 64, 256, 128, 16, 2304, 3)
    rocm.clear()
    for _ in range(2):
        assert _dispatch.select(None, inputs, needs_grad=True, op="gla_attention").name == "triton"
    assert rocm == ["triton", "flex"]  # the first-use probe of every usable backend of the order, once
    assert dk.backend_summary("cuda:0", torch.bfloat16) == "forward triton, backward triton (first-use probe)"
    with pytest.raises(dk.BackendUnavailableError, match="'cuda' cannot run.*needs an NVIDIA"):
        _dispatch.select("cuda", inputs, needs_grad=False, op="gla_attention")
