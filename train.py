"""Train the sync baseline and codistillation side by side, and compare them.

Single process, all groups local (the embedded default: both arms on MNIST-1D
with the 1-D CNN, 2 groups, in about a minute on 2 CPU cores):

    python train.py
    python train.py --mode=codistill --num_groups=4 --distance=mse --alpha=0.5
    python train.py --dataset=cifar10 --model=resnet20 --data_dir=~/tensorflow_datasets

Both arms use the same total batch (`--batch_size`; codistillation splits it
into `--num_groups` groups) and the same number of updates per model.
Writes to `--workdir`: `results.json`, `comparison.png`, and per arm
TensorBoard logs (`<arm>/tensorboard`) and a per-epoch `<arm>/history.csv`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app, flags, logging  # noqa: E402

from tf_codistill import backup as backup_mod  # noqa: E402
from tf_codistill.backup import BackupError  # noqa: E402
from tf_codistill.config import TrainConfig, check_directory  # noqa: E402
from tf_codistill.model import PeerFailureError  # noqa: E402
from tf_codistill.runner import train_and_evaluate  # noqa: E402

__all__ = ["TrainConfig", "train_and_evaluate"]

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "both", ["sync", "codistill", "both"], "Which arms to run.")
flags.DEFINE_integer("num_groups", 2, "Groups (models) in the codistillation arm.")
flags.DEFINE_enum(
    "data_mode",
    "auto",
    ["auto", "shared", "independent"],
    "Codistillation: every group sees the same batch (shared, the semantics of per-step "
    "prediction exchange) or each draws its own (independent, the paper's setting). "
    "auto: independent for the local exchange, shared for horovod.",
)
flags.DEFINE_enum(
    "exchange",
    "auto",
    ["auto", "local", "horovod", "weights"],
    "How groups exchange: local (all groups in this process, predictions every step), horovod "
    "(one process per worker, predictions every step over Horovod), or weights (stale peer "
    "copies refreshed every --exchange_every steps: in this process, over Horovod, or through "
    "--exchange_dir). auto: horovod when launched under Horovod, else local.",
)
flags.DEFINE_integer("exchange_every", 50, "Weights exchange: refresh peer copies every K steps (0: never).")
flags.DEFINE_string(
    "exchange_dir", None, "Weights exchange through this shared directory; this job is group --group."
)
flags.DEFINE_integer("group", -1, "With --exchange_dir: which group this job trains, in [0, num_groups).")
flags.DEFINE_float("peer_timeout", 300.0, "Weights exchange: seconds without news before a peer is stale.")
flags.DEFINE_enum(
    "on_stale", "keep", ["keep", "drop"], "A stale peer: keep its last copy, or drop alpha to 0."
)
flags.DEFINE_float(
    "collective_timeout", 120.0, "Seconds any collective or rendezvous may wait before the job fails."
)
flags.DEFINE_string("dataset", "mnist1d", "TFDS name: mnist1d, mnist1d/n<samples>, digits, cifar10, ...")
flags.DEFINE_string("data_dir", None, "TFDS data directory (TFDS's default when unset).")
flags.DEFINE_float("train_fraction", 1.0, "Train on this fraction of the training split, in (0, 1].")
flags.DEFINE_string("model", "cnn1d", "Model name: cnn1d, mlp, resnet20, resnet50.")
flags.DEFINE_integer("batch_size", 128, "Total batch per step over all groups (examples).")
flags.DEFINE_integer("epochs", 60, "Epochs of the sync arm; codistillation takes as many updates.")
flags.DEFINE_integer("steps", 0, "Total updates per model; overrides --epochs when > 0.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "SGD with momentum 0.9, or Adam.")
flags.DEFINE_float("base_lr", 0.4, "Learning rate per 256 examples of a model's batch (Goyal et al.).")
flags.DEFINE_enum("lr_schedule", "step", ["step", "cosine", "constant"], "Learning-rate schedule.")
flags.DEFINE_string(
    "lr_milestones",
    "goyal",
    "Step decays (x0.1): 'goyal' (1/3, 2/3, 8/9 of the run), "
    "'delayed' (the paper's fix, 18/38/44 of 45) or comma-separated fractions of the run.",
)
flags.DEFINE_string("codistill_lr_milestones", None, "Milestones for the codistillation arm only.")
flags.DEFINE_float("warmup_epochs", 2.0, "Linear warmup length in (sync) epochs.")
flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay on kernels (the constant, or the first value).")
flags.DEFINE_enum(
    "wd_schedule",
    "constant",
    ["constant", "paper"],
    "'paper': weight_decay, then /10 after the first lr decay, then 0 after the second.",
)
flags.DEFINE_enum(
    "codistill_wd_schedule",
    None,
    ["constant", "paper"],
    "Weight-decay schedule for the codistillation arm only.",
)
flags.DEFINE_float("alpha", 1.0, "Weight of the distillation term.")
flags.DEFINE_enum("distance", "kl", ["mse", "kl", "reverse_kl"], "Distance to the peers' logits.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature for the KL distances.")
flags.DEFINE_integer("burn_in_steps", 0, "Steps with alpha = 0 at the start.")
flags.DEFINE_integer("alpha_ramp_steps", 0, "Steps over which alpha ramps linearly up after burn-in.")
flags.DEFINE_integer("seed", 0, "Seed for initial weights and data order, in [0, 4294967].")
flags.DEFINE_string("workdir", "runs/default", "Where results, logs and plots go.")
flags.DEFINE_integer(
    "steps_per_execution", 1, "Training steps per compiled call (Keras); logs are reduced once per call."
)
flags.DEFINE_integer(
    "backup_keep",
    2,
    "Backups kept per process (written atomically at every epoch end; a rerun of the same command "
    "resumes from the newest intact one). 0: no backups.",
)
flags.DEFINE_integer("verbose", 2, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = TrainConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)})
    workdir = FLAGS.workdir
    try:
        check_directory("workdir", workdir)
        train_and_evaluate(config, workdir)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except PeerFailureError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(3)
    except BackupError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(4)
    except Exception as err:
        if _no_space(err):
            print(
                f"train.py: error: no space left on device while writing under {os.path.abspath(workdir)} "
                f"({_first_line(err)}). Backups are written whole or not at all; {_kept_backups(workdir)}. "
                "Free space, then run the same command to resume.",
                file=sys.stderr,
            )
            sys.exit(4)
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
        sys.exit(5)
    print(
        f"\nResults in {os.path.abspath(workdir)}: results.json, comparison.png, "
        f"TensorBoard logs (tensorboard --logdir {workdir})"
    )


if __name__ == "__main__":
    app.run(main)
