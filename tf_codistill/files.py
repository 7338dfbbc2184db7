"""Small filesystem helpers shared by the backups and the weights exchange."""

from __future__ import annotations

import os


def probe_writable(path: str) -> None:
    """Creates `path` if needed and writes, then removes, a small file in it.
    Raises OSError when the directory cannot be used."""
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".probe-{os.getpid()}")
    with open(probe, "w") as f:
        f.write("ok")
    os.remove(probe)


def fsync_dir(path: str) -> None:
    """Flushes a directory's entries (a rename into it) to disk, where the
    platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
