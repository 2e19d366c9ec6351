"""lipcodec.atomic: whole files or nothing, and no temp files left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from lipcodec.atomic import save_image_atomic, write_text_atomic


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "result.json"
    assert write_text_atomic(path, "first\n") == path
    write_text_atomic(str(path), "second\n")  # str paths too
    assert path.read_text() == "second\n"
    assert sorted(os.listdir(tmp_path)) == ["result.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's private 0600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, b"not text")  # fails inside the write
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_missing_folder_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "no" / "result.json", "x")
    assert os.listdir(tmp_path) == []


def test_image_round_trips_and_a_bad_extension_writes_nothing(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    path = tmp_path / "sheet.png"
    assert save_image_atomic(path, Image.fromarray(pixels)) == path
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    with pytest.raises(ValueError, match="unknown file extension"):
        save_image_atomic(tmp_path / "sheet.nope", Image.fromarray(pixels))
    assert sorted(os.listdir(tmp_path)) == ["sheet.png"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
