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


# Ampere, Ada, Hopper, plus PTX for anything newer. With a GPU visible and the
# variable unset, torch builds for the visible GPUs instead.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def visible_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/io/*.cpp")
                     + glob.glob("csrc/python/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    macros = [("TORCH_EXTENSION_NAME", "_C")]
    if want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not visible_gpu():
            # No GPU to build for (a build machine, CI): a documented list, with PTX
            # so newer GPUs JIT-compile instead of failing with "no kernel image".
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(f"exemplar: no GPU visible; building CUDA for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "exemplar._C",
            sources,
            define_macros=macros + [("EXEMPLAR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            libraries=["z"],
        )
    return cpp_extension.CppExtension(
        "exemplar._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        libraries=["z"],
    )


setup(
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
