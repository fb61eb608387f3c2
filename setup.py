"""Builds exemplar._C: the C++ ops always, the CUDA ops when torch has CUDA and
CUDA_HOME is set (FORCE_CUDA=1 / FORCE_CPU=1 override)."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def want_cuda() -> bool:
    if os.environ.get("FORCE_CPU") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch_has_cuda() and cpp_extension.CUDA_HOME is not None


def torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    macros = [("EXEMPLAR_PYTHON_MODULE", None)]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "exemplar._C",
            sources,
            define_macros=macros + [("EXEMPLAR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "exemplar._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
