"""Build of the compiled extension ``dlsn_kernels._C``.

CPU sources are always built. CUDA sources are built when a CUDA toolkit and a CUDA build of
torch are present; ``DLSN_WITH_CUDA=0`` skips them, ``DLSN_WITH_CUDA=1`` forces them (and fails
loudly when they cannot be built). A ROCm build of torch (``torch.version.hip`` set) gets the CPU
kernels only: the CUDA sources need NVIDIA's toolchain and there are no HIP kernels for the C++
backend, so ``DLSN_WITH_CUDA=1`` fails there. :func:`cuda_decision` makes that choice and says why.

OpenMP: the CPU kernels parallelise with ``at::parallel_for``, which ATen's headers expand into
``#pragma omp parallel`` inside this extension, so the extension must call the OpenMP runtime torch
itself uses, or a second runtime with its own threads and its own thread count would compete with
torch's. :func:`openmp_link_args` links the runtime bundled with torch when there is one.

``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are honoured by
``torch.utils.cpp_extension`` (Ninja is used when installed). Without ``TORCH_CUDA_ARCH_LIST``
torch targets the visible GPUs; with none visible, ``_default_cuda_archs`` picks the list.

Object files live in ``build/<torch version>-py<version>/`` rather than in the throwaway folder
that pip's editable install hands to setuptools, so a rebuild with nothing changed only relinks.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
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


_FLAG_OFF = ("0", "false", "no", "off")
_FLAG_ON = ("1", "true", "yes", "on")


def cuda_decision(
    flag: str, torch_cuda: str | None, torch_hip: str | None, cuda_home: str | None, has_nvcc: bool
) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and the line that says what is built and why.

    ``flag``: ``DLSN_WITH_CUDA`` ("" when unset); ``torch_cuda`` / ``torch_hip``: ``torch.version.cuda`` /
    ``torch.version.hip``; ``has_nvcc``: ``cuda_home/bin/nvcc`` exists. Exits (``SystemExit`` with the
    reason) when the flag is not a yes/no value, or forces CUDA where it cannot be built.
    """
    flag = flag.strip().lower()
    if flag and flag not in _FLAG_OFF + _FLAG_ON:
        raise SystemExit(f"DLSN_WITH_CUDA must be 0 or 1 (or unset: automatic), got {flag!r}")
    if flag in _FLAG_OFF:
        return False, "DLSN_WITH_CUDA=0: building the CPU kernels only (backends cpu and reference)"
    forced = flag in _FLAG_ON
    if torch_hip:
        why = (f"torch is a ROCm build (HIP {torch_hip}); the CUDA kernels need an NVIDIA (CUDA) build of torch "
               "and there are no HIP kernels for the C++ backend")
        if forced:
            raise SystemExit(f"DLSN_WITH_CUDA=1 but the CUDA kernels cannot be built here: {why}. "
                             "Unset DLSN_WITH_CUDA to build the CPU kernels.")
        return False, f"{why}: building the CPU kernels only (backends cpu and reference, no cuda)"
    # torch falls back to /usr/local/cuda or a stale CUDA_HOME without checking that nvcc is there
    available = torch_cuda is not None and has_nvcc
    if forced and not available:
        raise SystemExit(
            "DLSN_WITH_CUDA=1 but CUDA cannot be built here: "
            f"torch.version.cuda={torch_cuda!r}, CUDA_HOME={cuda_home!r}, "
            f"nvcc {'found' if has_nvcc else 'not found'} there"
        )
    if forced or available:
        return True, f"building the CPU and CUDA kernels (torch CUDA {torch_cuda}, nvcc in {cuda_home})"
    why = ("torch is a CPU-only build" if torch_cuda is None
           else f"no nvcc under CUDA_HOME={cuda_home!r} (install the CUDA toolkit or set CUDA_HOME)")
    return False, f"{why}: building the CPU kernels only (backends cpu and reference, no cuda)"


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    want, note = cuda_decision(os.environ.get("DLSN_WITH_CUDA", ""), torch.version.cuda,
                               getattr(torch.version, "hip", None), CUDA_HOME, has_nvcc)
    print(f"dlsn-kernels: {note}", flush=True)
    return want


def openmp_link_args(torch_lib_dir: str, platform: str = sys.platform) -> list[str]:
    """Link flags that give the extension torch's own OpenMP runtime.

    ``-fopenmp`` at link time adds the compiler's ``libgomp``. PyPI wheels of torch bundle their own
    runtime in ``torch/lib``: named ``libgomp.so.1`` in recent wheels (the loader then reuses torch's copy,
    already loaded, for the extension's ``libgomp.so.1``), but under a hashed name
    (``libgomp-<hash>.so.1``) in older ones, where ``-fopenmp`` would load the system's runtime beside
    torch's: two thread pools, two thread counts, and threads of one spinning while the other's work. So
    when torch ships a libgomp, the extension links that file, whose soname then names the runtime torch
    already loaded. Without one (conda or distribution builds of torch use the system's), ``-fopenmp``.
    macOS builds of torch have no OpenMP the extension could share: no flags, serial kernels.
    """
    if platform == "darwin":
        return []
    bundled = sorted(glob.glob(os.path.join(torch_lib_dir, "libgomp*.so*")))
    if len(bundled) == 1:
        return [bundled[0]]
    return ["-fopenmp"]


def _nvcc_archs(cuda_home: str) -> set[str]:
    """The real architectures nvcc can compile for, as "8.0", "9.0"... (empty if it cannot say)."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-code"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {f"{int(m[:-1])}.{m[-1]}" for m in re.findall(r"sm_(\d+)\b", out)}


def _default_cuda_archs(cuda_home: str) -> str:
    """TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible (a login node, a CI machine).

    torch would otherwise take the visible GPUs' architectures and crash on an empty list. Every
    data-centre generation this torch build ships kernels for gets machine code (A100 8.0, H100/H200
    9.0, B200 10.0), and the newest gets PTX too, which the driver compiles for any later GPU. The
    consumer-only variants (7.5, 8.6, 12.0) would each add a full device compile, and the 8.0 code
    runs on 8.6; set TORCH_CUDA_ARCH_LIST to target them exactly.
    """
    import torch

    shipped = {f"{int(a[3:-1])}.{a[-1]}" for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)}
    buildable = _nvcc_archs(cuda_home) or shipped
    wanted = [a for a in ("8.0", "9.0", "10.0") if a in shipped and a in buildable]
    if not wanted:  # an older or unusual torch build: its own newest architecture
        wanted = sorted(shipped & buildable, key=lambda a: tuple(map(int, a.split("."))))[-1:] or ["8.0"]
    return ";".join(wanted) + "+PTX"


def _choose_cuda_archs(cuda_home: str) -> None:
    """Fills TORCH_CUDA_ARCH_LIST when unset and no GPU is visible, and says which list the build uses."""
    import torch

    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        print(f"dlsn-kernels: CUDA architectures {given} (from TORCH_CUDA_ARCH_LIST)", flush=True)
    elif torch.cuda.is_available() and torch.cuda.device_count() > 0:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        print(f"dlsn-kernels: CUDA architectures of the visible GPUs ({', '.join(names)})", flush=True)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_archs(cuda_home)
        print(
            f"dlsn-kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building for CUDA architectures "
            f"{os.environ['TORCH_CUDA_ARCH_LIST']} (set TORCH_CUDA_ARCH_LIST to choose)",
            flush=True,
        )


def _extensions():
    _locate_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    sources = rel([os.path.join(ROOT, "csrc", "dlsn.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    import torch

    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx = ["-O3", *openmp]  # the C++ standard comes from torch (C++17 or C++20 by version)
    link_openmp = openmp_link_args(os.path.join(os.path.dirname(torch.__file__), "lib"))
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
                extra_link_args=link_openmp,
                py_limited_api=False,
            )
        ]
    return [
        CppExtension(
            "dlsn_kernels._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link_openmp,
        )
    ]


def _check_isolated_torch() -> None:
    """Fails early when pip's isolated build environment brought a torch other than the installed one.

    ``pip install -e .`` without ``--no-build-isolation`` compiles against a fresh torch from the index;
    an extension built against one torch release does not load in another.
    """
    from importlib.metadata import version

    building_with = version("torch")
    probe = "import importlib.metadata as m; print(m.version('torch'))"
    try:  # -I: the interpreter's own site-packages, without the build environment pip put on PYTHONPATH
        installed = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True).stdout.strip()
    except OSError:
        return
    if installed and installed != building_with:
        sys.exit(
            f"dlsn-kernels: this build would compile against torch {building_with} (pip's isolated build "
            f"environment), but torch {installed} is installed, and the extension would not load there. "
            "Build against the installed torch: pip install --no-build-isolation -e ."
        )


def _build_ext():
    import torch
    from torch.utils.cpp_extension import BuildExtension

    class PersistentBuildExtension(BuildExtension):
        """Keeps object files (and Ninja's record of them) between builds so Ninja can skip them."""

        def finalize_options(self) -> None:
            super().finalize_options()
            tag = f"{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
            self.build_temp = os.path.join(ROOT, "build", tag)

        def run(self) -> None:
            _check_isolated_torch()
            if any(isinstance(ext.extra_compile_args, dict) and "nvcc" in ext.extra_compile_args
                   for ext in self.extensions):
                from torch.utils.cpp_extension import CUDA_HOME

                _choose_cuda_archs(CUDA_HOME)
            super().run()

    return PersistentBuildExtension.with_options(use_ninja=True)


# pip's build backend runs this file as __main__; tests import it for cuda_decision and openmp_link_args.
if __name__ == "__main__":
    setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
