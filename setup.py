"""The compiled kernels (csrc/): built when torch is importable at install time (`make install`
runs pip with --no-build-isolation) and a C++ compiler works; otherwise the package installs
without them and the engine runs its torch-op paths (asyncpp/model/kernels.py says so once).
Everything else about the package is in pyproject.toml."""
from setuptools import setup


def kernel_build() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build without torch: no kernels
        return {}
    sources = ["csrc/ops.cpp", *(f"csrc/isa_{isa}.cpp" for isa in ("avx512bf16", "avx512", "avx2", "generic"))]
    ext = CppExtension("asyncpp._kernels", sources, optional=True,  # a failed compile is not a failed install
                       extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi"], extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}}


setup(**kernel_build())
