"""attnlab: an attention-performance lab for kernel engineers.

The repository's top-level folders are the import packages of one distribution:
kernels/ -> attnlab.kernels, bench/ -> attnlab.bench, analysis/ -> attnlab.analysis.
"""
from setuptools import setup

PACKAGES = {
    "attnlab": "attnlab",
    "attnlab.cli": "attnlab/cli",
    "attnlab.kernels": "kernels",
    "attnlab.kernels.impls": "kernels/impls",
    "attnlab.bench": "bench",
    "attnlab.analysis": "analysis",
    "attnlab.distributed": "distributed",
}

setup(
    name="attnlab",
    version="0.1.0",
    description="Measure how attention cost grows from 1k to 128k tokens, kernel by kernel.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=["torch", "triton", "numpy"],
    extras_require={
        "nvml": ["nvidia-ml-py"],
        "analysis": ["pandas", "scipy", "seaborn", "rich"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "playwright", "submitit>=1.5.4"],
        "slurm": ["submitit>=1.5.4"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["attnlab = attnlab.cli:main"]},
)
