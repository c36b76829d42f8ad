"""Install: `pip install -e .[dev]` (CPU) or `pip install -e .[gpu]` (adds Transformer Engine)."""

import re
from pathlib import Path

from setuptools import find_namespace_packages, setup

# The one supported Megatron-Core version (kat_megatron/parallel/mcore_version.py).
_VERSION_FILE = Path(__file__).parent / "kat_megatron" / "parallel" / "mcore_version.py"
SUPPORTED_MCORE = re.search(r'^SUPPORTED_MCORE = "(.+)"$', _VERSION_FILE.read_text(), re.M)[1]

setup(
    name="kat_megatron",
    version="0.1.0",
    description="Training stack for AutoThink (KAT-V1 style) reasoning models on Megatron-Core",
    python_requires=">=3.10",
    # namespace packages too: the asset folders (tokenizer, chat templates) are package data
    packages=find_namespace_packages(include=["kat_megatron", "kat_megatron.*"]),
    package_data={"kat_megatron": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        f"megatron-core=={SUPPORTED_MCORE}",
        "numpy",
        "pyyaml",
        "psutil",
        "tqdm",
        "einops",
        "transformers",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "wandb",
        "httpx",
        "jinja2",
        "datasets",
        "math-verify[antlr4_13_2]",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "ruff", "openai"],
    },
    entry_points={"console_scripts": ["kat=kat_megatron.cli:main"]},
)
