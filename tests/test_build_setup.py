"""setup.py's build decisions, run without building: which kernels a torch build gets (CUDA, CPU-only,
ROCm simulated), and which OpenMP runtime the extension links."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    """setup.py as a module: it calls setup() only when run as __main__ (as pip's build backend runs it)."""
    spec = importlib.util.spec_from_file_location("dlsn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    argv = sys.argv
    try:
        sys.argv = ["setup.py"]
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    return module


def test_rocm_torch_builds_the_cpu_kernels_and_says_why(setup_module):
    want, note = setup_module.cuda_decision("", None, "6.2.41133", None, False)  # DLSN_WITH_CUDA unset
    assert want is False
    assert "ROCm build (HIP 6.2.41133)" in note and "CPU kernels only" in note and "no cuda" in note
    # Even with a CUDA toolkit installed beside it, a ROCm torch cannot take the CUDA sources.
    assert setup_module.cuda_decision("", None, "6.2", "/usr/local/cuda", True)[0] is False
    assert setup_module.cuda_decision("0", None, "6.2", None, False)[0] is False


def test_forcing_cuda_on_rocm_fails_clearly(setup_module):
    with pytest.raises(SystemExit, match=r"DLSN_WITH_CUDA=1 but .*ROCm build \(HIP 6\.2\).*NVIDIA"):
        setup_module.cuda_decision("1", None, "6.2", "/opt/rocm", False)


def test_cuda_and_cpu_only_torch(setup_module):
    assert setup_module.cuda_decision("", "13.0", None, "/usr/local/cuda", True) == (
        True, "building the CPU and CUDA kernels (torch CUDA 13.0, nvcc in /usr/local/cuda)")
    want, note = setup_module.cuda_decision("", None, None, None, False)
    assert not want and note.startswith("torch is a CPU-only build")
    want, note = setup_module.cuda_decision("", "13.0", None, "/usr/local", False)
    assert not want and "no nvcc" in note
    assert setup_module.cuda_decision("off", "13.0", None, "/usr/local/cuda", True)[0] is False
    with pytest.raises(SystemExit, match="nvcc not found"):
        setup_module.cuda_decision("1", "13.0", None, "/usr/local", False)
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        setup_module.cuda_decision("maybe", "13.0", None, "/usr/local/cuda", True)


def test_simulated_rocm_torch_gets_a_cpu_only_extension(setup_module, monkeypatch, capsys):
    """The whole extension description on a ROCm torch (torch.version.hip set, torch.version.cuda None): the
    C++ sources only, no .cu files, no nvcc flags, and the build log says why."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    monkeypatch.delenv("DLSN_WITH_CUDA", raising=False)
    (ext,) = setup_module._extensions()
    assert not any(source.endswith(".cu") for source in ext.sources)
    assert all(source.endswith(".cpp") for source in ext.sources)
    assert isinstance(ext.extra_compile_args, dict) and "nvcc" not in ext.extra_compile_args
    assert "-DDLSN_WITH_CUDA" not in ext.extra_compile_args["cxx"]
    assert "ROCm build (HIP 6.2.41133)" in capsys.readouterr().out
    monkeypatch.setenv("DLSN_WITH_CUDA", "1")
    with pytest.raises(SystemExit, match="ROCm"):
        setup_module._extensions()


def test_openmp_links_torchs_bundled_runtime(setup_module, tmp_path):
    assert setup_module.openmp_link_args(str(tmp_path)) == ["-fopenmp"]  # none bundled: the compiler's
    bundled = tmp_path / "libgomp-a34b3233.so.1"  # an older wheel's hashed name
    bundled.write_bytes(b"")
    assert setup_module.openmp_link_args(str(tmp_path)) == [str(bundled)]
    assert setup_module.openmp_link_args(str(tmp_path), platform="darwin") == []
