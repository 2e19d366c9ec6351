"""The examples run as written, and the docs show them as they are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_planner.py"
DOC = ROOT / "docs" / "custom-planners.md"


def _doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_custom_planner_example():
    run = subprocess.run(
        [sys.executable, "examples/custom_planner.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "block-match passes lipcodec.testing.check_planner (20 clip x GOP runs)"
    assert lines[1] == "still: Plan 9x4x6 tokens, IBbPBbPPI, kept 48/216 (22.2%)"  # only the two I-frames
    assert lines[-1] == "pan, same place only: kept 100.0%; with a one-token search: kept 25.9%"
    # the docs show the example's real output
    assert run.stdout in _doc_blocks("text")


def test_custom_planner_doc_shows_the_example_file():
    assert EXAMPLE.read_text() in _doc_blocks("python")
