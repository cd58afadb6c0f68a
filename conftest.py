"""`pytest --benchmark-only` from the repository root runs the benchmark grid (benchmarks/) alone:
tests/ is left out of what it collects, rather than collected and listed as skips before the
grid. Named explicitly (`pytest --benchmark-only tests/...`), tests are collected as asked."""
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent / "tests"


def pytest_configure(config):
    if config.getoption("benchmark_only", False) and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.args[:] = [arg for arg in config.args if Path(arg).resolve() != TESTS]
