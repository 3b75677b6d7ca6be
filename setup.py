"""Build of the compiled extension ``dlsn_kernels._C``.

CPU sources are always built. CUDA sources are built when a CUDA toolkit and a CUDA build of
torch are present; ``DLSN_WITH_CUDA=0`` skips them, ``DLSN_WITH_CUDA=1`` forces them (and fails
loudly when they cannot be built). ``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are honoured by
``torch.utils.cpp_extension`` (Ninja is used when installed).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("DLSN_WITH_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if not available:
            sys.exit(
                "DLSN_WITH_CUDA=1 but CUDA cannot be built here: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    return available


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    sources = rel([os.path.join(ROOT, "csrc", "dlsn.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx = ["-O3", *openmp]  # the C++ standard comes from torch (C++17 or C++20 by version)
    include = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        return [
            CUDAExtension(
                "dlsn_kernels._C",
                sources,
                include_dirs=include,
                extra_compile_args={"cxx": cxx + ["-DDLSN_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=openmp,
                py_limited_api=False,
            )
        ]
    return [
        CppExtension(
            "dlsn_kernels._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
