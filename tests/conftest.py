"""Shared test markers.

``@pytest.mark.needs_cxx``: the test runs ``torch.compile`` on the CPU, which builds C++;
without a compiler it is skipped with the fix in the reason.
"""

from __future__ import annotations

import shutil

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cxx: torch.compile on the CPU (needs a C++ compiler)")


def pytest_collection_modifyitems(config, items):
    if any(map(shutil.which, ("g++", "c++", "clang++"))):
        return
    skip = pytest.mark.skip(reason="torch.compile on the CPU builds C++: install a C++ compiler (g++)")
    for item in items:
        if "needs_cxx" in item.keywords:
            item.add_marker(skip)
