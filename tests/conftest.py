"""Test-session setup.

Triton decides at its first import whether it interprets kernels, so the interpreter is switched on
here, before any test module imports it, whenever no GPU is present: the Triton backend then runs
for real on CPU tensors (slowly; the Triton tests keep their shapes small).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
