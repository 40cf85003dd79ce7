"""Files that appear whole or not at all: downloads, token files, checkpoints."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: on success it is fsynced and renamed over `path`, on an error deleted.

    The temporary file lies in the same folder, so the rename stays within one filesystem and is atomic; it is
    hidden and ends in ".part", so no glob for the real files (*.ckpt, *.bin) matches it. Readers see the old
    file or the new one, never a mix, and a kill leaves at most a `.<name>.*.part` file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    # created as open() creates files (0666 less the umask), not owner-only as tempfile.mkstemp makes them
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself survives a crash
        finally:
            os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)
