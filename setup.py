"""Build of the compiled extension ``dlsn_kernels._C``.

CPU sources are always built. CUDA sources are built when a CUDA toolkit and a CUDA build of
torch are present; ``DLSN_WITH_CUDA=0`` skips them, ``DLSN_WITH_CUDA=1`` forces them (and fails
loudly when they cannot be built). ``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are honoured by
``torch.utils.cpp_extension`` (Ninja is used when installed).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home() -> None:
    """Point torch at the real toolkit when ``nvcc`` on PATH is a wrapper script.

    torch derives CUDA_HOME from ``which nvcc``; a wrapper in /usr/local/bin makes that /usr/local,
    where neither libcudart nor the CUDA headers live. The conventional /usr/local/cuda wins then.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc and not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda.h")):
        for candidate in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = candidate
                return


def _cuda_library_headers(cuda_home: str) -> list[str]:
    """Include dirs of the CUDA math libraries (cuSPARSE, cuBLAS...) that torch's headers include.

    A bare toolkit may ship without them while the pip wheels of torch's CUDA dependencies
    (``nvidia-*``) carry them; use those when the toolkit lacks ``cusparse.h``.
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        candidates = glob.glob(os.path.join(base, "*", "include"))
        found += [d for d in candidates if os.path.exists(os.path.join(d, "cusparse.h"))]
    return found[:1]


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
    _locate_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    sources = rel([os.path.join(ROOT, "csrc", "dlsn.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx = ["-O3", *openmp]  # the C++ standard comes from torch (C++17 or C++20 by version)
    include = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        # the .cu launchers, and registration.cpp (argument checks, built by the C++ compiler)
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                       glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        include += _cuda_library_headers(CUDA_HOME)
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
