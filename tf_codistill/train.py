"""Train the sync baseline and codistillation side by side, and compare them.

Single process, all groups local (the embedded default: both arms on MNIST-1D
with the 1-D CNN, 2 groups, in about a minute on 2 CPU cores):

    python -m tf_codistill.train
    python -m tf_codistill.train --mode=codistill --num_groups=4 --distance=mse --alpha=0.5
    python train.py --dataset=cifar10 --model=resnet20 --data_dir=~/tensorflow_datasets   # the same, from a clone

Both arms use the same total batch (`--batch_size`; codistillation splits it
into `--num_groups` groups) and the same number of updates per model.
Writes to `--workdir`: `results.json`, `comparison.png`, and per arm
TensorBoard logs (`<arm>/tensorboard`) and a per-epoch `<arm>/history.csv`.
The repository's top-level `train.py` runs this module.
"""

from __future__ import annotations

import errno
import gc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app, flags, logging  # noqa: E402

# Settings only: TensorFlow is imported after the flags are parsed, so that
# --help and flag errors answer at once.
from tf_codistill import config as config_module  # noqa: E402
from tf_codistill import settings as settings_module  # noqa: E402
from tf_codistill.config import ExitStatus, TrainConfig, check_directory, define_flags  # noqa: E402

__all__ = ["TrainConfig", "train_and_evaluate"]  # noqa: F822 - train_and_evaluate: __getattr__, lazily

FLAGS = flags.FLAGS

define_flags(FLAGS)  # one flag per TrainConfig field (tf_codistill/config.py)
flags.adopt_module_key_flags(settings_module)  # --help lists them as train.py's own
flags.DEFINE_string("workdir", "runs/default", "Where results, logs and plots go.")

_HELP = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def __getattr__(name):
    if name == "train_and_evaluate":  # train.train_and_evaluate, loading TensorFlow on first use
        from tf_codistill.runner import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _usage_error(message: str) -> None:
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(ExitStatus.USAGE)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with every mistake one line on stderr and exit status 2
    (absl's own: a FATAL block and status 1; a stray argument: the whole help)."""
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        _usage_error(" ".join(str(err).split()) + " (train.py --help lists the flags)")
    except SystemExit:  # absl's --help exits 1 after printing the help
        if any(arg in _HELP or arg.split("=")[0] in _HELP for arg in argv[1:]):
            sys.exit(0)
        raise
    if len(rest) > 1:
        _usage_error(
            f"unexpected argument {rest[1]!r}: every setting is a flag, written --name=value "
            "(train.py --help lists them)."
        )
    return rest


def _causes(err: BaseException, limit: int = 10):
    """`err`, then what caused it, and so on (at most `limit` links)."""
    for _ in range(limit):
        if err is None:
            return
        yield err
        err = err.__cause__ or err.__context__


def _no_space(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a full disk, from Python or TensorFlow."""
    return any(
        (isinstance(link, OSError) and link.errno == errno.ENOSPC) or "No space left on device" in str(link)
        for link in _causes(err)
    )


# What a failed collective says when another process of the job is gone or
# stopped: Horovod/Gloo timeouts and shutdowns, TensorFlow's coordination
# service and collective executor.
_PEER_LOST = (
    "Timed out waiting",
    "stopped sending heartbeats",
    "Horovod has been shut down",
    "is unhealthy",
    "Connection reset by peer",
    "Connection closed by peer",
)


def _peer_lost(err: BaseException) -> str | None:
    """The line of `err` (or what caused it) that says a peer is gone, else None."""
    for link in _causes(err):
        for line in str(link).splitlines():
            if any(marker in line for marker in _PEER_LOST):
                return line.strip()[:300]
    return None


def _kept_backups(workdir: str) -> str:
    """Which backups under `workdir` are whole, in words."""
    from tf_codistill import backup as backup_mod

    kept = []
    for arm in ("sync", "codistill"):
        root = os.path.join(workdir, arm, "backup")
        if not os.path.isdir(root):
            continue
        folders = [root] + [os.path.join(root, n) for n in sorted(os.listdir(root))]
        for folder in folders:
            epochs = backup_mod.intact_epochs(folder)
            if epochs:
                kept.append(f"{os.path.relpath(folder, workdir)} epoch {epochs[0]}")
    return "the newest intact: " + ", ".join(kept) if kept else "none had been written yet"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def main(argv, model_fn=None):
    """Flags -> config -> run -> exit status. `model_fn(spec, seed)` builds a
    member instead of the `--model` registry entry (benchmarks use it)."""
    del argv  # parse_flags accepts no positional arguments
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = TrainConfig(**{name: FLAGS[name].value for name in config_module.SETTINGS})
    workdir = FLAGS.workdir
    try:
        check_directory("workdir", workdir)
        config.validate()  # the common mistakes, before TensorFlow loads
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.USAGE)
    for note in config.deprecations():  # an older spelling, still accepted
        print(f"train.py: note: {note}", file=sys.stderr)
    from tf_codistill.backup import BackupError
    from tf_codistill.model import PeerFailureError
    from tf_codistill.preemption import Preempted
    from tf_codistill.runner import train_and_evaluate

    try:
        train_and_evaluate(config, workdir, model_fn=model_fn)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.USAGE)
    except Preempted as err:
        print(f"train.py: preempted: {err}. Run the same command to resume.", file=sys.stderr, flush=True)
        # The backup is on disk: skip the collection of TensorFlow's objects at
        # interpreter exit (measured: 5 s of a grace period, down to 0.1 s).
        gc.freeze()
        sys.exit(ExitStatus.PREEMPTED)
    except PeerFailureError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.DIVERGED)
    except BackupError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.STORAGE)
    except Exception as err:
        if _no_space(err):
            print(
                f"train.py: error: no space left on device while writing under {os.path.abspath(workdir)} "
                f"({_first_line(err)}). Backups are written whole or not at all; {_kept_backups(workdir)}. "
                "Free space, then run the same command to resume.",
                file=sys.stderr,
            )
            sys.exit(ExitStatus.STORAGE)
        lost = _peer_lost(err)
        if lost is None:
            raise
        print(
            f"train.py: error: lost contact with another process of the job ({lost}). A peer died or "
            f"stopped responding for --collective_timeout={config.collective_timeout:g} s (inside a "
            "MultiWorkerMirroredStrategy group TensorFlow's heartbeat decides, about 25 s); its own output "
            "says why. Run the same command again to resume from the last backup.",
            file=sys.stderr,
        )
        sys.exit(ExitStatus.PEER_LOST)
    print(
        f"\nResults in {os.path.abspath(workdir)}: results.json, comparison.png, "
        f"TensorBoard logs (tensorboard --logdir {workdir})"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
