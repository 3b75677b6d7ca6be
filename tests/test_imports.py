"""What ``import dlsn_kernels`` costs: Triton is imported only when the Triton backend is first used."""

import subprocess
import sys


def test_import_does_not_import_triton():
    code = "import sys, dlsn_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
