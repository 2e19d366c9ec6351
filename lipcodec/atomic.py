"""Publishing finished outputs: the last step of every atomic write in lipcodec."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def publish(tmp, path) -> Path:
    """Rename the finished temp file or folder ``tmp`` onto ``path`` in one step.

    ``tempfile.mkstemp``/``mkdtemp`` create private files (0600) and folders (0700); the
    output gets the permissions a plain ``open()``/``mkdir()`` would have given it instead.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, (0o777 if Path(tmp).is_dir() else 0o666) & ~mask)
    os.replace(tmp, path)
    return Path(path)


def _write_atomic(path, write, suffix: str = ".tmp") -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        write(fd, tmp)
        return publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file beside it, renamed over ``path`` when
    complete: readers never see half a file. A failed write leaves the old file (or none) and
    removes its temp file; a killed process may leave the hidden ``.NAME.*.tmp``, never a
    half-written ``path``."""

    def write(fd, tmp):
        with os.fdopen(fd, "w") as f:
            f.write(text)

    return _write_atomic(path, write)


def save_image_atomic(path, image) -> Path:
    """Save a PIL image to ``path`` the same way; the format comes from the extension (an
    unknown one is PIL's ``ValueError``, and nothing is written)."""

    def write(fd, tmp):
        os.close(fd)
        image.save(tmp)

    return _write_atomic(path, write, suffix=".tmp" + Path(path).suffix)
