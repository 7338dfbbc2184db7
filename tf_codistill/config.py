"""The settings of a comparison run (train.py's flags), declared once."""

from __future__ import annotations

import dataclasses
import math
import os

from tf_codistill.checks import is_int, is_number


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
