"""Shared test markers and fixtures.

``@pytest.mark.needs_cxx``: the test runs ``torch.compile`` on the CPU, which builds C++;
without a compiler it is skipped with the fix in the reason.
``repo_script``: loads one of the repository's scripts (benchmarks/, scripts/) as a module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lipcodec.testing import load_script


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cxx: torch.compile on the CPU (needs a C++ compiler)")


def pytest_collection_modifyitems(config, items):
    if any(map(shutil.which, ("g++", "c++", "clang++"))):
        return
    skip = pytest.mark.skip(reason="torch.compile on the CPU builds C++: install a C++ compiler (g++)")
    for item in items:
        if "needs_cxx" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_script():
    """``repo_script("benchmarks/gpu_suite.py")``: that script as a module (not installed with the package)."""

    def load(relative: str):
        return load_script(Path(__file__).resolve().parents[1] / relative)

    return load
