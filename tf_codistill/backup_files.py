"""The files of a training backup, read and checked without a model: which
backups a directory holds, their `meta.json`, and whether their checksums
still match (`tf_codistill.backup.Backup` writes them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from tf_codistill import files

WEIGHTS = "state.weights.h5"
EXCHANGE = "exchange.npz"  # the exchange's own state (stale peer copies), when it has one
METRICS = "metrics.npz"  # mid-epoch backups: the running totals of the epoch's metrics
META = "meta.json"
_TMP = ".tmp-"


class BackupError(RuntimeError):
    """A backup could not be written (the directory is full or unwritable)."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    if files.is_local(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(files.read_bytes(path))
    return digest.hexdigest()


def _epoch_names(directory: str, unit: str = "epoch") -> dict[int, str]:
    prefix = f"{unit}-"
    return {
        int(name[len(prefix) :]): name
        for name in files.listdir(directory)
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    }


def list_backups(directory: str, unit: str = "epoch") -> list[int]:
    """Epochs (or steps, with `unit="step"`) of the complete backups in
    `directory` (those with a `meta.json`), newest first, not yet checked
    against their checksums."""
    return sorted(
        (
            e
            for e, name in _epoch_names(directory, unit).items()
            if files.exists(files.join(directory, name, META))
        ),
        reverse=True,
    )


def read_meta(directory: str, epoch: int, unit: str = "epoch") -> dict:
    return json.loads(files.read_bytes(files.join(directory, f"{unit}-{epoch:06d}", META)).decode())


def verify(directory: str, epoch: int, unit: str = "epoch") -> str | None:
    """None when the backup of `epoch` is intact, else why it is not."""
    path = files.join(directory, f"{unit}-{epoch:06d}")
    try:
        meta = read_meta(directory, epoch, unit)
    except (OSError, ValueError) as e:
        return f"unreadable {META} ({e})"
    expected_sums = {WEIGHTS: meta.get("sha256")}
    if meta.get("exchange_sha256"):
        expected_sums[EXCHANGE] = meta["exchange_sha256"]
    if meta.get("metrics_sha256"):
        expected_sums[METRICS] = meta["metrics_sha256"]
    for name, expected in expected_sums.items():
        if not files.exists(files.join(path, name)):
            return f"{name} is missing"
        try:
            actual = _sha256(files.join(path, name))
        except OSError as e:
            return f"unreadable {name} ({e})"
        if actual != expected:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


def intact_epochs(
    directory: str, on_skip: Callable[[int, str], None] | None = None, unit: str = "epoch"
) -> list[int]:
    """Epochs of the backups in `directory` that pass their checksums, newest
    first; `on_skip(epoch, why)` hears of each one that does not."""
    good = []
    for epoch in list_backups(directory, unit):
        problem = verify(directory, epoch, unit)
        if problem is None:
            good.append(epoch)
        elif on_skip is not None:
            on_skip(epoch, problem)
    return good
