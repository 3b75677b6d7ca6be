"""Test-session setup.

Triton decides at its first import whether it interprets kernels, so the interpreter is switched on
here, before any test module imports it, whenever no GPU is present: the Triton backend then runs
for real on CPU tensors (slowly; the Triton tests keep their shapes small).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    """With DLSN_REQUIRE_EXTENSION=1 (scripts/test.sh, CI) a missing build fails the run instead of
    turning every compiled-kernel test into a skip."""
    if os.environ.get("DLSN_REQUIRE_EXTENSION") == "1":
        import dlsn_kernels

        reason = dlsn_kernels.available_backends("cpu")["cpu"].reason
        if reason is not None:
            pytest.exit(f"DLSN_REQUIRE_EXTENSION=1 but the CPU backend cannot run: {reason}", returncode=3)
