"""Build script: packages fastdiff, installs the top-level kernels/ folder as fastdiff.kernels, and
optionally builds the CUDA C++ extension in csrc/ ahead of time (FASTDIFF_BUILD_CUDA=1, with pip's
--no-build-isolation: the build imports torch, which pip's isolated build environment lacks)."""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"]
package_dir = {"fastdiff.kernels": "kernels"}

ext_modules = []
cmdclass = {}
if os.environ.get("FASTDIFF_BUILD_CUDA") == "1":
    # Imported lazily: a plain install must not need a CUDA toolkit.
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith((".cu", ".cpp"))
    )
    ext_modules.append(
        CUDAExtension(
            name="fastdiff._C",
            sources=sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-arch=sm_90"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=packages,
    package_dir=package_dir,
    include_package_data=True,
    package_data={"fastdiff": ["assets/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
