"""Packaging: the pure-Python package (kernels/ and bench/ installed as d2v.kernels and d2v.bench) and the
optional compiled extension d2v._C built from csrc/.

D2V_BUILD_EXT=auto (default): build d2v._C if torch and a C++ compiler are there; on any failure warn and
install the pure-Python package. D2V_BUILD_EXT=1: a failed build is an error. D2V_BUILD_EXT=0: skip it.
The CUDA kernels (csrc/cuda/) are added when torch is a CUDA build and nvcc is found (D2V_BUILD_CUDA=0 skips).
Build with `pip install --no-build-isolation -e .` so that the installed torch is the one built against.
"""
import glob
import os
import sys

from setuptools import setup

PACKAGES = ["d2v", "d2v.core", "d2v.runtime", "d2v.encoders", "d2v.ops", "d2v.models", "d2v.data", "d2v.kernels", "d2v.bench"]
PACKAGE_DIR = {"d2v.kernels": "kernels", "d2v.bench": "bench"}
HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("D2V_BUILD_EXT", "auto").strip().lower()
CUDA_ARCHS = os.environ.get("D2V_CUDA_ARCHS", "80;90")


def _warn(message):
    print(f"WARNING: d2v._C: {message}; installing the pure-Python package (backends 'cpu'/'cuda' unavailable)",
          file=sys.stderr)


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    """(ext_modules, cmdclass) for d2v._C, or ([], {}) when it is skipped."""
    if MODE == "0":
        print("d2v._C: skipped (D2V_BUILD_EXT=0)", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in the build environment: nothing to build against
        if MODE == "1":
            raise RuntimeError(f"D2V_BUILD_EXT=1 but torch is not importable: {exc}") from exc
        _warn(f"torch is not importable in the build environment ({exc})")
        return [], {}

    sources = _sources("csrc/*.cpp")
    define_macros = []
    cxx_flags = ["-O3", "-g0", "-fopenmp"]  # torch adds its -std=; -g0: no debug info, faster builds
    nvcc_flags = ["-O3"]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("D2V_BUILD_CUDA", "1") != "0")
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        define_macros.append(("D2V_WITH_CUDA", None))
        for arch in CUDA_ARCHS.replace(",", ";").split(";"):
            if arch.strip():
                nvcc_flags.append(f"-gencode=arch=compute_{arch.strip()},code=sm_{arch.strip()}")
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind(
        name="d2v._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else cxx_flags,
        extra_link_args=["-fopenmp"],
    )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build; under D2V_BUILD_EXT=auto a failure becomes a warning, not a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if MODE == "1":
                    raise
                _warn(f"build failed ({type(exc).__name__}: {exc})")

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
