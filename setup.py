"""Build the megatron_coord package and its C++ extension ``megatron_coord._C``.

Install with ``pip install --no-build-isolation -e .`` after ``torch==2.13.0`` is installed
(scripts/setup.sh does both): the extension must be compiled against the torch it runs with.
"""

import glob

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="megatron_coord",
    version="0.1.0",
    packages=find_packages(include=["megatron_coord", "megatron_coord.*"]),
    ext_modules=[
        CppExtension(
            name="megatron_coord._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            # setuptools adds -g; -g0 after it drops debug info (~10 s of compile time here).
            extra_compile_args=["-O2", "-g0"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
    python_requires=">=3.10",
)
