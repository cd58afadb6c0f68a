"""Shared test set-up. Triton kernels run on a CPU only in Triton's interpreter, which Triton
reads when a kernel module is imported, so it is chosen here before anything imports Triton.
Kernel plugins named in ATTNLAB_KERNEL_MODULES (or installed under the attnlab.kernels entry
point) are loaded next, so the contract tests hold them to the in-tree kernels' checks.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    from attnlab.kernels import load_plugins

    failures = load_plugins()
    if failures:
        raise pytest.UsageError("kernel plugins did not load: " + "; ".join(map(str, failures)))


@pytest.fixture(autouse=True, scope="session")
def not_a_worker_below():
    """Under pytest-xdist (the README's `-n 2`) a worker's environment names it a worker; a pytest
    or attnlab that a test starts in a subprocess must not take itself for one (pytest-benchmark
    would then write nothing)."""
    for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:
        del os.environ[name]
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
