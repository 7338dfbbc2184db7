"""Filesystem helpers shared by the backups and the weights exchange.

Paths go through `tf.io.gfile`, so a workdir or an exchange directory may be
local or on any filesystem TensorFlow knows: `gs://` (Cloud Storage, what a
TPU job has instead of a shared POSIX disk), `s3://` where a plugin provides
it, and `ram://` (in-memory, one process; what the tests use).

Two semantics differ between a local disk and an object store, and callers
rely on the helpers here for both:

* Atomic replacement: `replace` writes nothing itself; callers write to a
  temporary name in the same directory and `replace` it onto the final name
  (`tf.io.gfile.rename(..., overwrite=True)`). On a local disk that is
  rename(2), atomic. On Cloud Storage a rename is a copy then a delete: the
  final object appears whole (object writes are atomic) but the temporary one
  lingers until the delete, and a crash between the two leaves both. Readers
  therefore ignore temporary names and verify what they read (the backups
  carry SHA-256 checksums, the weights snapshots are self-describing `.npz`
  archives whose reader skips unreadable files).
* Durability: gfile has no fsync. Local files are fsynced through `os`;
  remote ones are durable once their write call returns.
"""

from __future__ import annotations

import contextlib
import os
import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path: str) -> bool:
    """True for a path on this machine's filesystem (no `scheme://`, or `file://`)."""
    path = os.fspath(path)
    return not _SCHEME.match(path) or path.startswith("file://")


def _local(path: str) -> str:
    path = os.fspath(path)
    return path[len("file://") :] if path.startswith("file://") else path


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def absolute(path: str) -> str:
    """`os.path.abspath` for local paths; remote paths are returned as given."""
    path = os.fspath(path)
    return os.path.abspath(_local(path)) if is_local(path) else path.rstrip("/")


def join(path: str, *parts: str) -> str:
    """Joins path components with `/` (the separator of every gfile filesystem)."""
    return "/".join([os.fspath(path).rstrip("/"), *parts]) if parts else os.fspath(path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
    else:
        _gfile().makedirs(path)


def exists(path: str) -> bool:
    return os.path.exists(_local(path)) if is_local(path) else _gfile().exists(path)


def isdir(path: str) -> bool:
    return os.path.isdir(_local(path)) if is_local(path) else _gfile().isdir(path)


def listdir(path: str) -> list[str]:
    """Entry names in `path` (without a trailing `/` on sub-directories); [] when missing."""
    try:
        names = os.listdir(_local(path)) if is_local(path) else _gfile().listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except Exception as err:  # tf.errors.NotFoundError
        if type(err).__name__ == "NotFoundError":
            return []
        raise
    return [name.rstrip("/") for name in names]


def remove(path: str) -> None:
    """Deletes a file; a file that is already gone is not an error."""
    if is_local(path):
        try:
            os.remove(_local(path))
        except FileNotFoundError:
            pass
        return
    import tensorflow as tf

    try:
        tf.io.gfile.remove(path)
    except tf.errors.NotFoundError:
        pass


def rmtree(path: str) -> None:
    """Deletes a directory tree, ignoring errors (like `shutil.rmtree(ignore_errors=True)`)."""
    if is_local(path):
        import shutil

        shutil.rmtree(_local(path), ignore_errors=True)
        return
    import tensorflow as tf

    try:
        tf.io.gfile.rmtree(path)
    except (tf.errors.OpError, OSError):
        pass


def replace(source: str, target: str) -> None:
    """Moves the file `source` onto `target`, replacing it: atomic locally
    (rename(2)); copy then delete on Cloud Storage (see the module docstring).
    Both must be on the same filesystem."""
    if is_local(source) and is_local(target):
        os.replace(_local(source), _local(target))
    else:
        _gfile().rename(source, target, overwrite=True)


def write_bytes(path: str, data: bytes, sync: bool = True) -> None:
    """Writes `data` to `path` (fsynced when local and `sync`)."""
    if is_local(path):
        with open(_local(path), "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        return
    remove(path)  # TensorFlow's ram:// appends to an existing file instead of truncating it
    with _gfile().GFile(path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    """The content of `path`. Raises FileNotFoundError when it does not exist."""
    if is_local(path):
        with open(_local(path), "rb") as f:
            return f.read()
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError as err:
        raise FileNotFoundError(2, "No such file", path) from err


def write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to a temporary name next to `path`, then `replace`s it
    onto `path`: readers see the old content or the new, never a part."""
    tmp = join(os.path.dirname(os.fspath(path).rstrip("/")), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        write_bytes(tmp, data)
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(tmp)
        raise


def copy_from_local(local_path: str, path: str) -> None:
    """Copies a local file to `path` (any filesystem), replacing it."""
    if is_local(path):
        import shutil

        shutil.copyfile(local_path, _local(path))
    else:
        remove(path)  # as in write_bytes: not every filesystem truncates
        _gfile().copy(local_path, path, overwrite=True)


def copy_to_local(path: str, local_path: str) -> None:
    """Copies `path` (any filesystem) to a local file."""
    if is_local(path):
        import shutil

        shutil.copyfile(_local(path), local_path)
    else:
        _gfile().copy(path, local_path, overwrite=True)


def probe_writable(path: str) -> None:
    """Creates `path` if needed and writes, then removes, a small file in it.
    Raises OSError when the directory cannot be used (on any filesystem)."""
    probe = join(path, f".probe-{os.getpid()}")
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
        with open(_local(probe), "w") as f:
            f.write("ok")
        os.remove(_local(probe))
        return
    import tensorflow as tf

    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except tf.errors.OpError as err:
        raise OSError(f"{type(err).__name__}: {err.message}") from err


def fsync_dir(path: str) -> None:
    """Flushes a local directory's entries (a rename into it) to disk, where
    the platform allows it; nothing for remote paths (gfile has no fsync)."""
    if not is_local(path):
        return
    try:
        fd = os.open(_local(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
