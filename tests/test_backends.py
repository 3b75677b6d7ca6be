"""available_backends on CUDA devices: the GPU backends are reported unavailable, with the reason,
wherever no GPU can run them (issue 13: it used to report triton as available on a GPU-less machine)."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels._ops import backend_unavailable_reason


def _reasons(device: str) -> dict[str, str | None]:
    return {name: status.reason for name, status in dk.available_backends(device).items()}

NO_GPU = "no CUDA GPU is visible"


def test_this_machine_reports_the_truth_for_cuda_tensors():
    reasons = _reasons("cuda")
    assert reasons["reference"] is None
    if torch.version.cuda is None:
        for name in ("cuda", "triton"):
            assert "has no CUDA support" in reasons[name]
    elif not torch.cuda.is_available():
        assert reasons["cuda"] == reasons["triton"] == f"{NO_GPU} (torch.cuda.is_available() is False)"
    else:  # a GPU machine: whatever else may be missing, it is not the GPU
        for name in ("cuda", "triton"):
            assert reasons[name] is None or NO_GPU not in reasons[name]


def test_no_visible_gpu_makes_both_gpu_backends_unavailable(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = _reasons("cuda:0")
    assert NO_GPU in reasons["cuda"]
    assert NO_GPU in reasons["triton"]
    assert reasons["reference"] is None
    assert reasons["cpu"] is not None  # CPU kernels never take CUDA tensors


def test_cpu_only_torch_build_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    reasons = _reasons("cuda")
    for name in ("cuda", "triton"):
        assert "has no CUDA support" in reasons[name]
        assert torch.__version__ in reasons[name]


def test_missing_device_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    reasons = _reasons("cuda:3")
    assert reasons["cuda"] == reasons["triton"] == "CUDA device 3 does not exist (1 visible)"


def test_cpu_tensors_are_unaffected_by_the_gpu_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = _reasons("cpu")
    assert reasons["cuda"] == "the cuda backend takes CUDA tensors, got cpu"
    assert NO_GPU not in (reasons["triton"] or "")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*reference, cpu, cuda, triton"):
        backend_unavailable_reason("tpu", torch.device("cpu"))
