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

import csv
import dataclasses
import errno
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import keras  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from tf_codistill import backup as backup_mod  # noqa: E402
from tf_codistill.backup import BackupError  # noqa: E402
from tf_codistill.checks import is_int, is_number  # noqa: E402
from tf_codistill.model import PeerFailureError  # noqa: E402

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


@dataclasses.dataclass
class TrainConfig:
    """Everything one comparison needs. Field meanings match the flags."""

    mode: str = "both"
    num_groups: int = 2
    data_mode: str = "auto"
    exchange: str = "auto"
    collective_timeout: float = 120.0
    exchange_every: int = 50
    exchange_dir: str | None = None
    group: int = -1
    peer_timeout: float = 300.0
    on_stale: str = "keep"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    train_fraction: float = 1.0
    model: str = "cnn1d"
    batch_size: int = 128
    epochs: int = 60
    steps: int = 0
    optimizer: str = "sgd"
    base_lr: float = 0.4
    lr_schedule: str = "step"
    lr_milestones: str = "goyal"
    codistill_lr_milestones: str | None = None
    warmup_epochs: float = 2.0
    weight_decay: float = 1e-4
    wd_schedule: str = "constant"
    codistill_wd_schedule: str | None = None
    alpha: float = 1.0
    distance: str = "kl"
    temperature: float = 1.0
    burn_in_steps: int = 0
    alpha_ramp_steps: int = 0
    seed: int = 0
    steps_per_execution: int = 1
    backup_keep: int = 2
    verbose: int = 2

    @classmethod
    def from_flags(cls) -> TrainConfig:
        return cls(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)})

    def arms(self) -> list[str]:
        return ["sync", "codistill"] if self.mode == "both" else [self.mode]

    def resolved_exchange(self) -> str:
        if self.exchange == "auto":
            from tf_codistill import topology

            # horovodrun / MPIJob, or a TFJob of several workers (bootstrapped by start_runtime)
            return "horovod" if topology.multi_process_launch() else "local"
        return self.exchange

    def resolved_data_mode(self) -> str:
        if self.data_mode == "auto":
            return "shared" if self.resolved_exchange() == "horovod" else "independent"
        return self.data_mode

    def under_horovod(self) -> bool:
        """Launched by horovodrun, or as a TFJob of several workers. Raises
        ValueError for a TFJob's TF_CONFIG that train.py cannot run."""
        from tf_codistill import topology

        return self.resolved_exchange() == "horovod" or (
            self.resolved_exchange() == "weights" and topology.multi_process_launch()
        )

    def separate_group(self) -> bool:
        """This job trains one group and meets the others in --exchange_dir."""
        return self.resolved_exchange() == "weights" and self.exchange_dir is not None

    def validate(self) -> None:
        """Raises ValueError naming the bad setting and what to do instead
        (TypeError for a value of the wrong type, e.g. a string for a number)."""
        from models import MODELS
        from tf_codistill.losses import get_distance

        def bad(msg):
            raise ValueError(msg)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type.split(" |")[0]  # "int", "float", "str" (or "str | None")
            if value is None and f.type.endswith("| None"):
                continue
            accepts, what = _FIELD_TYPES[kind]
            if not accepts(value):
                raise TypeError(f"--{f.name} must be {what}, got {value!r}.")
            if kind == "float" and not math.isfinite(value):  # nan fails every comparison below
                bad(f"--{f.name} must be a finite number, got {value}.")
        if self.mode not in ("sync", "codistill", "both"):
            bad(f"--mode must be sync, codistill or both; got {self.mode!r}.")
        if self.num_groups < 1:
            bad(f"--num_groups must be >= 1, got {self.num_groups}.")
        if self.mode != "sync" and self.num_groups < 2:
            bad(
                f"--num_groups={self.num_groups}: codistillation needs at least 2 groups (use --mode=sync for one)."
            )
        if self.data_mode not in ("auto", "shared", "independent"):
            bad(f"--data_mode must be auto, shared or independent; got {self.data_mode!r}.")
        if self.exchange not in ("auto", "local", "horovod", "weights"):
            bad(f"--exchange must be auto, local, horovod or weights; got {self.exchange!r}.")
        if self.exchange_every < 0:
            bad(f"--exchange_every must be >= 0 steps (0: never refresh), got {self.exchange_every}.")
        if self.peer_timeout <= 0:
            bad(f"--peer_timeout must be > 0 seconds, got {self.peer_timeout}.")
        if self.on_stale not in ("keep", "drop"):
            bad(f"--on_stale must be keep or drop; got {self.on_stale!r}.")
        if self.exchange_dir is not None:
            if not self.exchange_dir.strip():
                bad("--exchange_dir is empty: give the shared directory, or leave the flag out.")
            if self.resolved_exchange() != "weights":
                bad("--exchange_dir is for the stale-weights exchange: add --exchange=weights.")
            check_directory("exchange_dir", self.exchange_dir)
        if self.separate_group():
            if self.mode != "codistill":
                bad("--exchange_dir runs one codistillation group per job: use --mode=codistill.")
            if not 0 <= self.group < max(self.num_groups, 1):
                bad(
                    f"--group={self.group}: with --exchange_dir each job trains one group; "
                    f"pass --group in [0, {self.num_groups})."
                )
        elif self.group != -1:
            bad("--group only applies with --exchange=weights --exchange_dir=...")
        if self.collective_timeout <= 0:
            bad(f"--collective_timeout must be > 0 seconds, got {self.collective_timeout}.")
        if self.under_horovod() or self.separate_group():
            if self.mode == "both":
                bad(
                    "--mode=both runs both arms in one process; a multi-process job runs one arm. "
                    "Launch --mode=sync and --mode=codistill separately."
                )
            if (
                self.resolved_exchange() == "horovod"
                and self.mode == "codistill"
                and self.resolved_data_mode() == "independent"
            ):
                bad(
                    "--exchange=horovod swaps predictions on the same examples every step, which "
                    "needs --data_mode=shared; independent data orders need the stale-weights exchange."
                )
            if (
                self.resolved_exchange() == "weights"
                and self.mode == "codistill"
                and self.data_mode == "shared"
            ):
                bad(
                    "--data_mode=shared: with --exchange=weights across jobs or processes every group "
                    "draws its own data order; use --data_mode=independent (or auto)."
                )
        if self.model not in MODELS:
            bad(f"Unknown model {self.model!r}. Choose one of {sorted(MODELS)}.")
        if not self.dataset.strip():
            bad("--dataset is empty: give a name such as mnist1d, mnist1d/n<samples>, digits or cifar10.")
        if self.data_dir is not None:
            check_directory("data_dir", self.data_dir, must_write=False)
        if self.batch_size < 1:
            bad(f"--batch_size must be >= 1, got {self.batch_size}.")
        if self.mode != "sync" and self.batch_size % self.num_groups:
            bad(
                f"--batch_size={self.batch_size} is not divisible by --num_groups={self.num_groups}; "
                "each group takes batch_size / num_groups examples per step."
            )
        if self.epochs < 0:
            bad(f"--epochs must be >= 0, got {self.epochs}.")
        if self.steps < 0:
            bad(f"--steps must be >= 0, got {self.steps}.")
        if self.epochs < 1 and self.steps < 1:
            bad("Set --epochs >= 1 or --steps >= 1.")
        if self.backup_keep < 0:
            bad(f"--backup_keep must be >= 0 (0: no backups), got {self.backup_keep}.")
        if self.steps_per_execution < 1:
            bad(f"--steps_per_execution must be >= 1, got {self.steps_per_execution}.")
        if self.optimizer not in ("sgd", "adam"):
            bad(f"--optimizer must be sgd or adam; got {self.optimizer!r}.")
        if self.base_lr <= 0:
            bad(f"--base_lr must be > 0, got {self.base_lr}.")
        if self.lr_schedule not in ("step", "cosine", "constant"):
            bad(f"--lr_schedule must be step, cosine or constant; got {self.lr_schedule!r}.")
        if self.weight_decay < 0:
            bad(f"--weight_decay must be >= 0, got {self.weight_decay}.")
        if self.alpha < 0:
            bad(f"--alpha must be >= 0, got {self.alpha}. alpha=0 turns the distillation term off.")
        if self.temperature <= 0:
            bad(
                f"--temperature must be > 0, got {self.temperature}. Use 1.0 for the plain softmax; "
                "larger values soften both distributions."
            )
        if self.warmup_epochs < 0:
            bad(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}.")
        if self.burn_in_steps < 0 or self.alpha_ramp_steps < 0:
            bad("--burn_in_steps and --alpha_ramp_steps must be >= 0.")
        if not 0 < self.train_fraction <= 1:
            bad(f"--train_fraction must be in (0, 1], got {self.train_fraction}.")
        max_seed = (2**32 - self.num_groups) // 1000
        if not 0 <= self.seed <= max_seed:
            bad(
                f"--seed must be in [0, {max_seed}], got {self.seed}: group g's model is seeded "
                "with seed * 1000 + g, which must fit in 32 bits."
            )
        if self.verbose not in (0, 1, 2):
            bad(
                f"--verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {self.verbose}."
            )
        get_distance(self.distance, self.temperature)  # validates the name
        for name in ("lr_milestones", "codistill_lr_milestones"):
            value = getattr(self, name)
            if value is not None:
                parse_milestones(value, name)
        if self.lr_schedule != "step":
            if self.lr_milestones != "goyal":
                bad(f"--lr_milestones only applies to --lr_schedule=step, not {self.lr_schedule}.")
            if self.codistill_lr_milestones is not None:
                bad(f"--codistill_lr_milestones only applies to --lr_schedule=step, not {self.lr_schedule}.")
        for name in ("wd_schedule", "codistill_wd_schedule"):
            value = getattr(self, name)
            if value is not None and value not in ("constant", "paper"):
                bad(f"--{name} must be constant or paper; got {value!r}.")
            if value == "paper" and self.lr_schedule != "step":
                bad(f"--{name}=paper follows the step schedule's decays; use --lr_schedule=step.")
        if self.mode == "sync":
            for name in ("codistill_lr_milestones", "codistill_wd_schedule"):
                if getattr(self, name) is not None:
                    bad(f"--{name} applies to the codistillation arm only, and --mode=sync has none.")
        for arm in self.arms():
            milestones_flag = "lr_milestones"
            wd_flag = "wd_schedule"
            if arm == "codistill":
                if self.codistill_lr_milestones is not None:
                    milestones_flag = "codistill_lr_milestones"
                if self.codistill_wd_schedule is not None:
                    wd_flag = "codistill_wd_schedule"
            milestones = getattr(self, milestones_flag)
            if getattr(self, wd_flag) == "paper" and len(parse_milestones(milestones)) < 2:
                bad(
                    f"--{wd_flag}=paper changes weight decay at the first two lr decays, but "
                    f"--{milestones_flag}={milestones!r} has one; give at least two milestones."
                )

    def run_length(self, num_train: int) -> tuple[int, int, int]:
        """(steps per epoch, updates per model, epochs) on `num_train`
        examples; `--steps` is rounded up to whole epochs of
        `num_train // batch_size` steps (fewer when the run is shorter)."""
        steps_per_epoch = max(1, num_train // self.batch_size)
        total = self.steps if self.steps > 0 else self.epochs * steps_per_epoch
        epochs = max(1, -(-total // steps_per_epoch))
        return min(steps_per_epoch, total), total, epochs

    def check_run_length(self, num_train: int) -> list[str]:
        """Checks the settings that depend on the run's length in steps (known
        once the training set's size is). Raises ValueError; returns warnings."""
        steps_per_epoch, total, _ = self.run_length(num_train)
        if self.mode != "sync" and self.burn_in_steps >= total:
            raise ValueError(
                f"--burn_in_steps={self.burn_in_steps} covers the whole run ({total} steps), so alpha "
                f"stays 0 and the groups never distil; use fewer than {total} burn-in steps."
            )
        warnings = []
        warmup = int(round(self.warmup_epochs * steps_per_epoch))
        if warmup >= total:
            warnings.append(
                f"--warmup_epochs={self.warmup_epochs:g} is {warmup} steps, not shorter than the run "
                f"({total} steps): it is cut to {max(total - 1, 0)} steps, so the learning rate peaks only "
                "at the last step. Lower --warmup_epochs."
            )
        if (
            self.mode != "sync"
            and self.alpha_ramp_steps
            and self.burn_in_steps + self.alpha_ramp_steps > total
        ):
            warnings.append(
                f"--burn_in_steps + --alpha_ramp_steps = {self.burn_in_steps + self.alpha_ramp_steps} "
                f"steps, longer than the run ({total} steps): alpha never reaches {self.alpha:g}."
            )
        return warnings


_FIELD_TYPES = {
    "int": (is_int, "an integer"),
    "float": (is_number, "a number"),
    "str": (lambda value: isinstance(value, str), "a string"),
}


def check_directory(flag: str, path: str, must_write: bool = True) -> None:
    """Raises ValueError unless `path` is a directory this process can write
    to, or can create. `must_write=False` accepts an existing read-only
    directory (e.g. prepared datasets)."""
    if not path.strip():
        raise ValueError(f"--{flag} is empty: give a directory.")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--{flag}={path} is an existing file, not a directory; choose another path.")
        if must_write and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--{flag}={path} is not writable; choose a directory you can write to.")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--{flag}={path} cannot be created: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag}={path} cannot be created: {parent} is not writable.")


def parse_milestones(text: str, flag: str = "lr_milestones") -> tuple[float, ...]:
    from tf_codistill.schedules import MILESTONE_PRESETS

    if text in MILESTONE_PRESETS:
        return MILESTONE_PRESETS[text]
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if (
        not values
        or any(not 0 < v < 1 for v in values)  # also rejects nan and inf
        or any(a >= b for a, b in zip(values, values[1:]))
    ):
        raise ValueError(
            f"--{flag}={text!r}: give {' or '.join(MILESTONE_PRESETS)} or increasing fractions "
            "of the run in (0, 1), e.g. 0.4,0.84,0.98."
        )
    return values


# --------------------------------------------------------------------------- arms
def _arm_settings(config: TrainConfig, arm: str, total_steps: int, steps_per_epoch: int):
    """Batch per model, lr schedule, weight decay and alpha for one arm."""
    from tf_codistill import schedules

    groups = 1 if arm == "sync" else config.num_groups
    batch = config.batch_size // groups
    peak = schedules.goyal_learning_rate(config.base_lr, batch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    milestones_text = config.lr_milestones
    wd_kind = config.wd_schedule
    if arm == "codistill":
        milestones_text = config.codistill_lr_milestones or milestones_text
        wd_kind = config.codistill_wd_schedule or wd_kind
    boundaries = schedules.milestone_steps(parse_milestones(milestones_text), total_steps)
    if config.lr_schedule == "step":
        lr = schedules.WarmupPiecewiseDecay(peak, boundaries, 0.1, warmup)
    elif config.lr_schedule == "cosine":
        lr = schedules.WarmupCosineDecay(peak, total_steps, warmup)
    else:
        lr = schedules.WarmupPiecewiseDecay(peak, [], 0.1, warmup)
    if wd_kind == "paper" and config.weight_decay > 0:
        wd = schedules.paper_weight_decay(boundaries, (config.weight_decay, config.weight_decay / 10, 0.0))
    else:
        wd = config.weight_decay
    alpha = schedules.AlphaSchedule(config.alpha, config.burn_in_steps, config.alpha_ramp_steps)
    return groups, batch, lr, wd, alpha


class TrainTimer(keras.callbacks.Callback):
    """Sums the time spent in training batches, leaving out evaluation."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()


def _resumed(backup) -> bool:
    return backup is not None and backup.restored_epoch is not None


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """`CSVLogger` that, after a resume, rewrites the file from the backup's
    history: every epoch appears once, however the kill fell between the
    backup and the row."""

    def __init__(self, path: str, backup=None):
        super().__init__(path, append=True)
        self.backup = backup

    def on_train_begin(self, logs=None):
        if _resumed(self.backup):
            history = self.backup.restored_history
            keys = sorted(history)
            with open(self.filename, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["epoch", *keys])
                for epoch in range(len(history[keys[0]]) if keys else 0):
                    writer.writerow([epoch, *(history[k][epoch] for k in keys)])
        elif os.path.exists(self.filename):
            os.remove(self.filename)
        super().on_train_begin(logs)


class StepLogger(keras.callbacks.Callback):
    """Writes every training batch's logs (running epoch means) as JSON lines.
    After a resume it keeps the lines up to the restored step and appends."""

    def __init__(self, path: str, backup=None):
        super().__init__()
        self.path = path
        self.backup = backup
        self._file = None
        self._step = 0

    def on_train_begin(self, logs=None):
        self._step = int(self.model.optimizer.iterations.numpy())
        kept = []
        if _resumed(self.backup) and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= self._step:
                            kept.append(line)
                    except (ValueError, KeyError):
                        break  # a line cut short by the kill
        self._file = open(self.path, "w")  # noqa: SIM115 - closed in on_train_end
        self._file.writelines(kept)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        row = {"step": self._step, **{k: float(v) for k, v in (logs or {}).items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a line per step is never lost to a kill after its step

    def on_train_end(self, logs=None):
        self._file.close()


@dataclasses.dataclass
class Runtime:
    """Where an arm runs: one process (all groups local), or this process's
    place in a Horovod job with its group's strategy."""

    topology: object = None
    strategy: object = None
    pair_set: object = None
    group_set: object = None

    @property
    def distributed(self) -> bool:
        return self.topology is not None

    @property
    def world_size(self) -> int:
        return self.topology.world_size if self.distributed else 1


def start_runtime(config: TrainConfig) -> Runtime:
    """Joins the Horovod job and builds this group's strategy. Runs before any
    other TensorFlow op (MultiWorkerMirroredStrategy requires it)."""
    from tf_codistill import topology

    # A TFJob's workers (cloud TF_CONFIG) set up Horovod themselves; no-op under horovodrun.
    topology.bootstrap_from_tf_config(config.collective_timeout)
    groups = 1 if config.mode == "sync" or config.separate_group() else config.num_groups
    topo, group_set, pair_set = topology.init_horovod(groups, config.collective_timeout)
    strategy = topology.make_group_strategy(topo, config.collective_timeout)
    return Runtime(topology=topo, strategy=strategy, pair_set=pair_set, group_set=group_set)


def _exchange_plan(config: TrainConfig, runtime: Runtime, groups: int):
    """Which groups this process trains, how to build its exchange (a
    function: it must run under the strategy's scope), and its data seed."""
    exchange_kind = config.resolved_exchange()
    if groups == 1:
        own = [runtime.topology.group] if runtime.distributed else [0]
        return own, lambda: None, config.seed
    if exchange_kind == "weights":
        from tf_codistill.exchange import weights

        if config.separate_group():
            group = config.group
            writer = not runtime.distributed or runtime.topology.rank == 0
            transport = weights.DirectoryTransport(config.exchange_dir, writer=writer)
        elif runtime.distributed:
            group = runtime.topology.group
            transport = weights.HorovodWeightsTransport(runtime.topology, runtime.pair_set, runtime.group_set)
        else:
            group, transport = 0, weights.LocalTransport()

        def make():
            return weights.StaleWeightsExchange(
                config.exchange_every,
                transport,
                group=group,
                num_groups=groups,
                peer_timeout=config.peer_timeout,
                on_stale=config.on_stale,
            )

        if config.separate_group() or runtime.distributed:
            return [group], make, config.seed + 1000 * group  # each group its own data order
        return list(range(groups)), make, config.seed
    if runtime.distributed:
        from tf_codistill.exchange import HorovodExchange

        return (
            [runtime.topology.group],
            lambda: HorovodExchange(runtime.topology, runtime.pair_set),
            config.seed,
        )
    return list(range(groups)), lambda: None, config.seed


def _train_data(config, spec, runtime, groups, batch_per_model, seed, skip=0):
    """Training batches for this process. Multi-process: every worker reads the
    same stream of group batches (same seed in every group) and takes its
    slice by rank in group, so paired workers read identical examples and a
    group's workers together see what one process would."""
    from tf_codistill import data

    if not runtime.distributed:
        if groups > 1 and config.resolved_data_mode() == "independent" and not config.separate_group():
            return data.independent_batches(spec, batch_per_model, groups, seed, config.data_dir, skip)
        return data.train_batches(spec, batch_per_model, seed, config.data_dir, skip_batches=skip)
    topo = runtime.topology

    def dataset_fn(context):
        where = (topo.rank_in_group, topo.group_size)
        return data.train_batches(
            spec, batch_per_model, seed, config.data_dir, slice_of=where, skip_batches=skip
        )

    return runtime.strategy.distribute_datasets_from_function(dataset_fn)


def _test_data(config, spec, runtime):
    from tf_codistill import data

    if not runtime.distributed:
        return data.eval_batches(spec, 1000, config.data_dir)
    topo = runtime.topology
    usable = spec.num_test - spec.num_test % topo.group_size  # equal shards: equal step counts

    def dataset_fn(context):
        return data.eval_batches(
            spec, 500, config.data_dir, shard=(topo.rank_in_group, topo.group_size), limit=usable
        )

    return runtime.strategy.distribute_datasets_from_function(dataset_fn)


def run_arm(config: TrainConfig, arm: str, spec, workdir: str, runtime: Runtime | None = None):
    """Trains and evaluates one arm. Returns (results.json run entry, history);
    in a multi-process job the entry describes this process's group."""
    from models import build_model, count_params
    from tf_codistill import CodistillModel

    runtime = runtime or Runtime()
    strategy = runtime.strategy or tf_default_strategy()
    steps_per_epoch, total_steps, epochs = config.run_length(spec.num_train)
    groups, batch, lr, wd, alpha = _arm_settings(config, arm, total_steps, steps_per_epoch)
    local_groups, make_exchange, data_seed = _exchange_plan(config, runtime, groups)

    arm_dir = os.path.join(workdir, arm)
    os.makedirs(arm_dir, exist_ok=True)
    timer = TrainTimer()
    backup = _make_backup(config, runtime, arm_dir, timer)
    # A resumed run reads on from where the backup's epoch ended.
    resume_epoch = backup.resume_epoch() if backup is not None else None
    skip = (resume_epoch or 0) * steps_per_epoch

    # Datasets first: tf.data shuffles depend on TF's global seed too, which
    # building each member with its own seed changes.
    keras.utils.set_random_seed(config.seed)
    train_ds = _train_data(config, spec, runtime, groups, batch, data_seed, skip)
    test_ds = _test_data(config, spec, runtime)
    with strategy.scope():
        exchange = make_exchange()
        members = [
            build_model(config.model, spec.input_shape, spec.num_classes, seed=config.seed * 1000 + g)
            for g in local_groups
        ]
        model = CodistillModel(
            members,
            distance=config.distance,
            temperature=config.temperature,
            alpha=alpha,
            data_mode=config.resolved_data_mode() if len(local_groups) > 1 else "shared",
            exchange=exchange,
            weight_decay=wd,
            num_classes=spec.num_classes,
            name=arm,
        )
        if config.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(lr, momentum=0.9)
        else:
            optimizer = keras.optimizers.Adam(lr)
        model.compile(
            optimizer=optimizer, metrics=["accuracy"], steps_per_execution=config.steps_per_execution
        )

    tag = ""
    if runtime.distributed:
        tag = f".rank{runtime.topology.rank}"
    # The backup first: it restores the step before the loggers open their
    # files, and they rewrite them to end where the backup does.
    callbacks = [backup] if backup is not None else []
    callbacks.append(timer)
    if not runtime.distributed or runtime.topology.is_group_chief:
        tb_dir = os.path.join(arm_dir, "tensorboard")
        if runtime.distributed:
            tb_dir = os.path.join(tb_dir, f"group{runtime.topology.group}")
        callbacks += [
            keras.callbacks.TensorBoard(tb_dir, update_freq=max(1, steps_per_epoch // 4)),
            ResumableCSVLogger(os.path.join(arm_dir, f"history{tag}.csv"), backup),
        ]
    callbacks.append(StepLogger(os.path.join(arm_dir, f"steps{tag}.jsonl"), backup))
    where = f"rank {runtime.topology.rank} (group {runtime.topology.group}) " if runtime.distributed else ""
    print(
        f"[{arm}] {where}{groups} group(s) x batch {batch}, {epochs * steps_per_epoch} updates per model "
        f"({epochs} epochs of {steps_per_epoch} steps), model {config.model} on {spec.name}",
        flush=True,
    )
    verbose = config.verbose if not runtime.distributed or runtime.topology.rank == 0 else 0
    start = time.perf_counter()
    history = model.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,
    ).history
    wall = time.perf_counter() - start
    if backup is not None:
        # Every epoch's logs, the ones before a resume included.
        history = backup.history
        timer.seconds += backup.restored_extra.get("train_seconds", 0.0)
        wall += backup.restored_extra.get("wall_seconds", 0.0)
    final = model.evaluate(test_ds, verbose=0, return_dict=True)

    num_params = count_params(members[0])
    per_group = []
    for i, g in enumerate(local_groups):
        prefix = f"g{i}_" if len(local_groups) > 1 else ""
        per_group.append(
            {
                "group": g,
                "test_accuracy": float(final[f"{prefix}accuracy"]),
                "test_loss": float(final[f"{prefix}loss"]),
                "train_loss": float(history[f"{prefix}task_loss"][-1]),
            }
        )
    steps_run = epochs * steps_per_epoch
    world = runtime.world_size
    in_group, cross_group, sent, equivalent = _traffic(
        config, runtime, exchange, groups, batch, spec, num_params
    )
    ensemble = final.get("ensemble_accuracy")
    entry = {
        "arm": arm,
        "num_groups": groups,
        "world_size": world,
        "exchange": (exchange.name if exchange else "local")
        if groups > 1
        else ("allreduce" if world > 1 else "none"),
        "data_mode": config.resolved_data_mode() if groups > 1 else "shared",
        "dataset": spec.name,
        "model": config.model,
        "seed": config.seed,
        "steps": steps_run,
        "epochs": epochs,
        "batch_size_per_group": batch,
        "groups": per_group,
        "ensemble_test_accuracy": float(ensemble) if ensemble is not None and groups > 1 else None,
        "bytes_sent_per_step": float(sent),
        "bytes_in_group_per_step": float(in_group),
        "bytes_cross_group_per_step": float(cross_group),
        "bytes_equivalent_per_step": float(equivalent),
        "params_per_model": num_params,
        "examples_per_second": steps_run * batch * len(local_groups) / max(timer.seconds, 1e-9),
        "wall_seconds": wall,
        "train_seconds": timer.seconds,
    }
    if runtime.distributed:
        entry["examples_per_second"] = steps_run * config.batch_size / max(timer.seconds, 1e-9)
        entry["weights_checksum"] = float(
            sum(float(v.numpy().astype("float64").sum()) for v in members[0].weights)
        )
        if os.path.isdir("/proc/self/task"):
            entry["threads"] = len(os.listdir("/proc/self/task"))
    if groups > 1:
        entry.update(distance=config.distance, alpha=config.alpha, temperature=config.temperature)
    if exchange is not None and exchange.name == "weights":
        entry["exchange"] = f"weights/{exchange.transport.name}"
        entry.update(
            exchange_every=config.exchange_every,
            staleness_max=max(history.get("staleness", [0.0])),
            peer_refreshes=exchange.refreshes,
            peer_refresh_seconds=exchange.refresh_seconds,
            peer_bytes_received=exchange.bytes_received,
        )
    if backup is not None:
        entry["resumed_from_epoch"] = backup.restored_epoch
        entry["backup_seconds"] = backup.save_seconds
    if not runtime.distributed or runtime.topology.is_group_chief:
        with open(os.path.join(arm_dir, f"history{tag}.json"), "w") as f:
            json.dump({k: [float(v) for v in vs] for k, vs in history.items()}, f, indent=1)
    return entry, history, backup


def _traffic(config: TrainConfig, runtime: Runtime, exchange, groups: int, batch: int, spec, num_params: int):
    """Bytes per training step, per worker: (inside the group, across
    groups, sent over a process boundary in all, what a multi-worker job of
    this arm would send)."""
    if runtime.distributed or config.separate_group():
        group_size = runtime.topology.group_size if runtime.distributed else 1
        in_group = 2 * (group_size - 1) / group_size * num_params * 4
        cross_group = (
            exchange.bytes_sent_per_step(batch // group_size, spec.num_classes, num_params)
            if exchange
            else 0.0
        )
        sent = in_group + cross_group
        equivalent = sent
    elif exchange is not None:
        in_group = cross_group = sent = 0.0
        equivalent = exchange.bytes_sent_per_step(batch, spec.num_classes, num_params)
    else:
        in_group = cross_group = sent = 0.0
        if groups > 1:
            # An all-gather of every group's logits: each worker sends its own
            # (batch x classes) block to each of the other groups.
            equivalent = (groups - 1) * batch * spec.num_classes * 4
        else:
            # Ring all-reduce of the gradient over as many workers as the
            # codistillation arm has groups.
            workers = max(config.num_groups, 1)
            equivalent = 2 * (workers - 1) / workers * num_params * 4
    return in_group, cross_group, sent, equivalent


def _make_backup(config: TrainConfig, runtime: Runtime, arm_dir: str, timer: TrainTimer):
    """This process's `Backup` (None with --backup_keep=0). Processes of one
    job each keep their own and agree on the epoch to resume from."""
    if config.backup_keep == 0:
        return None
    directory = os.path.join(arm_dir, "backup")
    agree = None
    if runtime.distributed:
        from tf_codistill import topology

        directory = os.path.join(directory, f"rank{runtime.topology.rank}")
        agree = topology.agree_on_epoch
    elif config.separate_group():
        directory = os.path.join(directory, f"group{config.group}")
    started = time.perf_counter()
    backup = None

    def extra():
        restored = backup.restored_extra if backup is not None else {}
        return {
            "train_seconds": timer.seconds + restored.get("train_seconds", 0.0),
            "wall_seconds": time.perf_counter() - started + restored.get("wall_seconds", 0.0),
        }

    backup = backup_mod.Backup(
        directory, keep=config.backup_keep, agree=agree, extra=extra, delete_on_finish=False
    )
    try:
        backup.check_writable()
    except backup_mod.BackupError as e:
        raise ValueError(str(e)) from e
    return backup


def tf_default_strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()


# ------------------------------------------------------------------------ report
def plot_histories(histories: dict[str, dict], path: str) -> None:
    """Test accuracy and training (task) loss per epoch, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"sync": "tab:blue", "codistill": "tab:orange"}
    for arm, h in histories.items():
        epochs = range(1, len(h["task_loss"]) + 1)
        color = colors.get(arm)
        label = arm if arm == "sync" else f"{arm} (mean of groups)"
        ax_acc.plot(epochs, h["val_accuracy"], label=label, color=color)
        if "val_ensemble_accuracy" in h:
            ax_acc.plot(epochs, h["val_ensemble_accuracy"], "--", label=f"{arm} ensemble", color=color)
        ax_loss.plot(epochs, h["task_loss"], label=label, color=color)
    ax_acc.set(xlabel="epoch (equal updates per model)", ylabel="test accuracy", title="Test accuracy")
    ax_loss.set(
        xlabel="epoch (equal updates per model)",
        ylabel="training task loss",
        title="Training loss",
        yscale="log",
    )
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    lows = [min(h["val_accuracy"][len(h["val_accuracy"]) // 3 :]) for h in histories.values()]
    if lows:
        ax_acc.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(runs: list[dict]) -> str:
    rows = [("", *[r["arm"] for r in runs])]

    def row(name, fn):
        rows.append((name, *[fn(r) for r in runs]))

    def mean(values):
        return sum(values) / len(values)

    row("groups x batch", lambda r: f"{r['num_groups']} x {r['batch_size_per_group']}")
    row("updates per model", lambda r: str(r["steps"]))
    row("test accuracy (mean of groups)", lambda r: f"{mean([g['test_accuracy'] for g in r['groups']]):.4f}")
    row("test accuracy per group", lambda r: " ".join(f"{g['test_accuracy']:.4f}" for g in r["groups"]))
    row(
        "ensemble test accuracy",
        lambda r: "-" if r["ensemble_test_accuracy"] is None else f"{r['ensemble_test_accuracy']:.4f}",
    )
    row("test loss (mean)", lambda r: f"{mean([g['test_loss'] for g in r['groups']]):.4f}")
    row("train task loss (mean)", lambda r: f"{mean([g['train_loss'] for g in r['groups']]):.4f}")
    row("bytes exchanged per step (equiv.)", lambda r: f"{r['bytes_equivalent_per_step']:,.0f}")
    row("examples / second", lambda r: f"{r['examples_per_second']:,.0f}")
    row("wall seconds", lambda r: f"{r['wall_seconds']:.1f}")
    widths = [max(len(str(c)) for c in col) for col in zip(*rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict:
    """Runs the configured arms and writes results.json, the plot and logs.

    Under Horovod (`--exchange=horovod`, or launched by tf_codistill.launch)
    this process joins the job and trains its group's model; rank 0 gathers
    every group's results and writes the files.

    Raises:
        ValueError: a bad setting, before anything is trained.
    """
    config.validate()
    runtime = start_runtime(config) if config.under_horovod() else Runtime()
    from models import build_model
    from tf_codistill import data

    spec = data.load_spec(config.dataset, config.data_dir, config.train_fraction)
    if spec.num_train < config.batch_size:
        raise ValueError(
            f"--batch_size={config.batch_size} is larger than the training set ({spec.num_train} "
            "examples); lower it or raise --train_fraction."
        )
    for warning in config.check_run_length(spec.num_train):
        if not runtime.distributed or runtime.topology.rank == 0:
            print(f"train.py: warning: {warning}", file=sys.stderr, flush=True)
    if config.batch_size % runtime.world_size:
        raise ValueError(
            f"--batch_size={config.batch_size} is not divisible by the {runtime.world_size} workers; "
            "every worker takes batch_size / workers examples per step."
        )
    if runtime.distributed and runtime.topology.group_size > 1 and config.steps_per_execution > 1:
        raise ValueError(
            "--steps_per_execution > 1 fails inside Keras 3.15 under MultiWorkerMirroredStrategy "
            "(a placeholder in the multi-step loop is never fed); use 1 for groups of several workers."
        )
    probe = build_model(config.model, spec.input_shape, spec.num_classes)
    data.check_labels(spec, int(probe.outputs[0].shape[-1]), config.data_dir)
    del probe

    os.makedirs(workdir, exist_ok=True)
    is_writer = not runtime.distributed or runtime.topology.rank == 0
    if is_writer:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)
    runs, histories, backups = [], {}, []
    for arm in config.arms():
        entry, history, backup = run_arm(config, arm, spec, workdir, runtime)
        if runtime.distributed:
            entry = _merge_ranks(entry, runtime)
        runs.append(entry)
        histories[arm] = history
        backups.append(backup)
    results = {"runs": runs}
    if is_writer:
        path = os.path.join(workdir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
        plot_histories(histories, os.path.join(workdir, "comparison.png"))
        print()
        print(format_table(runs))
    # Results are on disk: a rerun now starts afresh.
    for backup in backups:
        if backup is not None:
            backup.remove()
            try:  # the arm's backup/ folder, once every process has removed its own
                os.rmdir(os.path.dirname(backup.directory))
            except OSError:
                pass
    return results


def _merge_ranks(entry: dict, runtime: Runtime) -> dict:
    """Gathers every rank's entry; one entry for the job, groups from the
    group chiefs, per-rank weight checksums under "ranks"."""
    import horovod.tensorflow as hvd

    topo = runtime.topology
    everyone = hvd.allgather_object({"rank": topo.rank, "group": topo.group, **entry}, name="results")
    merged = dict(entry)
    chiefs = sorted((e for e in everyone if e["rank"] % topo.group_size == 0), key=lambda e: e["group"])
    merged["groups"] = [e["groups"][0] for e in chiefs]
    merged["ranks"] = [
        {
            "rank": e["rank"],
            "group": e["group"],
            "weights_checksum": e["weights_checksum"],
            "threads": e.get("threads"),
        }
        for e in sorted(everyone, key=lambda e: e["rank"])
    ]
    merged.pop("weights_checksum", None)
    merged.pop("threads", None)
    merged["wall_seconds"] = max(e["wall_seconds"] for e in everyone)
    merged["train_seconds"] = max(e["train_seconds"] for e in everyone)
    merged["examples_per_second"] = min(e["examples_per_second"] for e in everyone)
    return merged


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
    config = TrainConfig.from_flags()
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
