"""Publishing finished outputs: the last step of every atomic write in lipcodec."""

from __future__ import annotations

import os
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
