"""The settings of a comparison run (train.py's flags), declared once.

Each `TrainConfig` field is one setting (`tf_codistill.settings`): its name,
type and default are the field's; `setting(...)` adds the help text, the allowed values or range, and
any check of the value alone. From those declarations come

* the absl flags (`define_flags`, which train.py calls),
* the per-setting checks of `TrainConfig.validate` (type, finiteness, choices,
  range), after which `validate` checks how settings combine,
* the check of a study file's keys and values (`check_setting`, `parse_setting`).

This module imports neither TensorFlow nor Keras, so that `train.py --help`
and flag errors answer at once.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from tf_codistill.choices import (
    AVERAGE_TEACHERS,
    COLLECTIVE_IMPLEMENTATIONS,
    DATA_ORDERS,
    DISTANCES,
    EXCHANGE_KINDS,
    ON_STALE,
    PRECISIONS,
    TRANSPORTS,
)
from tf_codistill.settings import (
    Setting,
    check_directory,
    check_value,
    define_absl_flags,
    parse_value,
    setting,
    settings_of,
)

__all__ = [
    "Setting",
    "TrainConfig",
    "SETTINGS",
    "define_flags",
    "check_setting",
    "parse_setting",
    "check_directory",
    "parse_milestones",
    "ExitStatus",
]


#: --exchange's spellings from before kind and transport were two settings,
#: each the predictions kind with this --transport. Accepted with a notice.
LEGACY_EXCHANGES = {"auto": "auto", "local": "local", "horovod": "horovod"}

_WD_SCHEDULES = ("constant", "paper")

#: Datasets read as character windows (tf_codistill.text_data), and the folder
#: name of their local copy under a data root.
TEXT_DATASETS = {"tiny_shakespeare": "tinyshakespeare"}
#: Datasets whose training examples are generated fresh, never repeated
#: (tf_codistill.fresh_data): a stream, a fixed validation and test split.
FRESH_DATASETS = ("mnist1d_fresh",)


class ExitStatus(enum.IntEnum):
    """train.py's exit statuses, the one table its callers read (tf_codistill.study
    records a DIVERGED run as an outcome; docs/operations.md lists them)."""

    OK = 0
    USAGE = 2  # a bad flag or setting, said in one line before training
    DIVERGED = 3  # a group's predictions went NaN or Inf (PeerFailureError)
    STORAGE = 4  # a backup could not be written or does not fit, or the disk is full
    PEER_LOST = 5  # another process of the job died or stopped responding
    # SIGTERM/SIGINT: stopped at a step every process agreed on and backed it up; rerun to resume.
    # 128 + SIGTERM, as a shell reports a process SIGTERM ended: Kubeflow's restartPolicy ExitCode
    # (128-255: retryable) restarts it, and it is what the launcher reports when it forwards SIGTERM.
    PREEMPTED = 143


def _not_empty(what: str):
    def check(name: str, value) -> None:
        if not value.strip():
            raise ValueError(f"--{name} is empty: {what}")

    return check


def _milestones(name: str, value) -> None:
    if value not in MILESTONE_NAMES:  # a preset needs no parsing
        parse_milestones(value, name)


@dataclasses.dataclass
class TrainConfig:
    """Everything one comparison needs; each field is one train.py flag."""

    mode: str = setting("both", "Which arms to run.", choices=("sync", "codistill", "both"))
    num_groups: int = setting(2, "Groups (models) in the codistillation arm.", minimum=1)
    data_mode: str = setting(
        "auto",
        "Codistillation: every group sees the same batch (shared, the semantics of per-step "
        "prediction exchange) or each draws its own (independent, the paper's setting). "
        "auto: shared for predictions over Horovod, else independent.",
        choices=("auto", *DATA_ORDERS),
    )
    exchange: str = setting(
        "predictions",
        "What the groups exchange: predictions (every step), weights (stale peer copies refreshed "
        "every --exchange_every steps), or average (no distillation by default: the groups average "
        "their parameters every --exchange_every steps with an outer Nesterov SGD step, DiLoCo; "
        "--outer_lr=1 --outer_momentum=0 is local SGD). The older auto, local and horovod still mean "
        "predictions with that --transport, with a notice.",
        choices=(*EXCHANGE_KINDS, *LEGACY_EXCHANGES),
    )
    transport: str = setting(
        "auto",
        "How the exchange travels: local (every group in this process), horovod (one process per "
        "worker, launched under Horovod) or directory (weights through --exchange_dir, each group a "
        "separate job). auto: directory with --exchange_dir, horovod when launched under Horovod, "
        "else local.",
        choices=("auto", *TRANSPORTS),
    )
    collective_timeout: float = setting(
        120.0,
        "Seconds any collective or rendezvous may wait before the job fails.",
        minimum=0,
        above_minimum=True,
        unit="seconds",
    )
    exchange_every: int = setting(
        50,
        "Weights exchange: refresh peer copies every K steps (0: never); average: the steps H between "
        "outer steps.",
        minimum=0,
        unit="steps",
        note="0: never refresh",
    )
    exchange_dir: str | None = setting(
        None,
        "Weights exchange through this shared directory; this job is group --group.",
        check=_not_empty("give the shared directory, or leave the flag out."),
    )
    outer_lr: float = setting(
        0.7, "--exchange=average: the outer SGD's learning rate (DiLoCo: 0.7).", minimum=0, above_minimum=True
    )
    outer_momentum: float = setting(
        0.9, "--exchange=average: the outer SGD's Nesterov momentum (0: none).", minimum=0, maximum=0.999
    )
    average_teacher: str = setting(
        "shared",
        "--exchange=average with --alpha > 0: distil toward the shared weights of the last outer step, or "
        "toward the other islands' predictions at every step (peers; every island in one process).",
        choices=AVERAGE_TEACHERS,
    )
    group: int = setting(-1, "With --exchange_dir: which group this job trains, in [0, num_groups).")
    peer_timeout: float = setting(
        300.0,
        "Weights exchange: seconds without news before a peer is stale.",
        minimum=0,
        above_minimum=True,
        unit="seconds",
    )
    on_stale: str = setting("keep", "A stale peer: keep its last copy, or drop alpha to 0.", choices=ON_STALE)
    collective_implementation: str = setting(
        "auto",
        "All-reduce inside a group of several workers: auto (NCCL on GPU workers, RING otherwise), "
        "ring or nccl.",
        choices=COLLECTIVE_IMPLEMENTATIONS,
    )
    precision: str = setting(
        "float32",
        "Compute precision of the members: float32, mixed_bfloat16 or mixed_float16 (loss scaling); "
        "the task and distillation terms stay float32.",
        choices=PRECISIONS,
    )
    tpu: str | None = setting(
        None,
        "Train this job's group on a Cloud TPU ('local', a TPU name or grpc://host:port) with "
        "TPUStrategy; groups meet through --exchange_dir (e.g. gs://...). Not run on a TPU here.",
        check=_not_empty("give 'local', a TPU name or grpc://host:port, or leave the flag out."),
    )
    dataset: str = setting(
        "mnist1d",
        "TFDS name: mnist1d, mnist1d/n<samples>, digits, cifar10, ...; mnist1d_fresh: every training example "
        "generated fresh (never repeated), fixed validation and test splits.",
        check=_not_empty("give a name such as mnist1d, mnist1d/n<samples>, digits or cifar10."),
    )
    data_dir: str | None = setting(None, "TFDS data directory (TFDS's default when unset).")
    train_fraction: float = setting(
        1.0,
        "Train on this fraction of the training split, in (0, 1].",
        minimum=0,
        above_minimum=True,
        maximum=1,
    )
    validation_fraction: float = setting(
        0.0,
        "Hold out the last fraction of a TFDS dataset's training split as validation (like Keras's "
        "fit(validation_split=)): evaluated every epoch, where a study chooses; test only at the end. "
        "In [0, 1); the text and fresh datasets have their own.",
        minimum=0,
        maximum=1,
    )
    context: int = setting(
        64, "Text datasets (tiny_shakespeare): characters per window, the model's context.", minimum=1
    )
    model: str = setting(
        "cnn1d",
        "Model name: cnn1d, cnn1d_norm (GroupNorm, for large rates), mlp, resnet20, resnet50, transformer.",
    )
    layers: int = setting(4, "transformer: blocks.", minimum=1)
    heads: int = setting(4, "transformer: attention heads per block (they divide --width).", minimum=1)
    width: int = setting(128, "transformer: model width (embedding size).", minimum=1)
    dropout: float = setting(0.0, "transformer: dropout rate.", minimum=0, maximum=0.99)
    batch_size: int = setting(128, "Total batch per step over all groups (examples).", minimum=1)
    epochs: int = setting(60, "Epochs of the sync arm; codistillation takes as many updates.", minimum=0)
    steps: int = setting(0, "Total updates per model; overrides --epochs when > 0.", minimum=0)
    steps_per_epoch: int = setting(
        0,
        "Updates between evaluations (an epoch of the logs, backups and schedules' epoch units); "
        "0: one pass over the training set.",
        minimum=0,
        note="0: one pass over the training set",
    )
    optimizer: str = setting(
        "sgd",
        "SGD with momentum 0.9, Adam, AdamW (beta_2 0.99; --weight_decay decoupled, on kernels and "
        "embeddings), or LAMB (keras.optimizers.Lamb: Adam with a per-layer trust ratio, "
        "made for large batches; its lr is the relative change of each layer per step, so it wants a far "
        "smaller --base_lr than SGD).",
        choices=("sgd", "adam", "adamw", "lamb"),
    )
    base_lr: float = setting(
        0.4,
        "Learning rate per 256 examples of a model's batch (Goyal et al.).",
        minimum=0,
        above_minimum=True,
    )
    lr: float = setting(
        0.0,
        "Peak learning rate of every model, absolute (no batch scaling); overrides --base_lr when > 0.",
        minimum=0,
        note="0: --base_lr scaled by the batch",
    )
    lr_floor: float = setting(
        0.0, "Cosine schedule: the final rate as a fraction of the peak.", minimum=0, maximum=1
    )
    clip_norm: float = setting(
        0.0,
        "Clip each model's gradient to this global norm, every member on its own (0: no clipping).",
        minimum=0,
    )
    lr_schedule: str = setting("step", "Learning-rate schedule.", choices=("step", "cosine", "constant"))
    lr_milestones: str = setting(
        "goyal",
        "Step decays (x0.1): 'goyal' (1/3, 2/3, 8/9 of the run), "
        "'delayed' (the paper's fix, 18/38/44 of 45) or comma-separated fractions of the run.",
        check=_milestones,
    )
    codistill_lr_milestones: str | None = setting(
        None, "Milestones for the codistillation arm only.", check=_milestones
    )
    warmup_epochs: float = setting(2.0, "Linear warmup length in (sync) epochs.", minimum=0)
    warmup_steps: int = setting(
        0, "Linear warmup length in updates; overrides --warmup_epochs when > 0.", minimum=0, unit="updates"
    )
    target_accuracy: float = setting(
        0.0,
        "Record the updates to this validation accuracy (the first evaluation at or above it) in "
        "results.json; 0: none.",
        minimum=0,
        maximum=1,
        note="0: no target",
    )
    stop_at_target: int = setting(
        0, "1: end an arm at its first evaluation at or above --target_accuracy.", choices=(0, 1)
    )
    weight_decay: float = setting(
        1e-4, "L2 weight decay on kernels (the constant, or the first value).", minimum=0
    )
    wd_schedule: str = setting(
        "constant",
        "'paper': weight_decay, then /10 after the first lr decay, then 0 after the second.",
        choices=_WD_SCHEDULES,
    )
    codistill_wd_schedule: str | None = setting(
        None, "Weight-decay schedule for the codistillation arm only.", choices=_WD_SCHEDULES
    )
    alpha: float | None = setting(
        None,
        "Weight of the distillation term (default 1; 0 with --exchange=average: pure DiLoCo).",
        minimum=0,
        note="0 turns the distillation term off",
    )
    distance: str = setting("kl", "Distance to the peers' logits.", choices=DISTANCES)
    temperature: float = setting(
        1.0,
        "Softmax temperature for the KL distances.",
        minimum=0,
        above_minimum=True,
        note="1 for the plain softmax; larger values soften both distributions",
    )
    burn_in_steps: int = setting(0, "Steps with alpha = 0 at the start.", minimum=0)
    alpha_ramp_steps: int = setting(0, "Steps over which alpha ramps linearly up after burn-in.", minimum=0)
    seed: int = setting(0, "Seed for initial weights and data order, in [0, 4294967].")
    steps_per_execution: int = setting(
        1, "Training steps per compiled call (Keras); logs are reduced once per call.", minimum=1
    )
    backup_keep: int = setting(
        2,
        "Backups kept per process (written atomically at every epoch end; a rerun of the same command "
        "resumes from the newest intact one). 0: no backups.",
        minimum=0,
        note="0: no backups",
    )
    backup_every_steps: int = setting(
        0,
        "Also back up between steps whenever the update count is a multiple of this; a rerun then "
        "resumes mid-epoch. 0: at epoch ends only (SIGTERM still saves at the step it stops at).",
        minimum=0,
        unit="steps",
        note="0: at epoch ends only",
    )
    verbose: int = setting(
        2,
        "Console output: 0 silent, 1 progress bar, 2 one short line per epoch (pooled metrics), "
        "3 Keras's own line per epoch (every metric, each group's too).",
        choices=(0, 1, 2, 3),
        note="0 silent, 1 progress bar, 2 one short line per epoch, 3 Keras's full line per epoch",
    )

    def arms(self) -> list[str]:
        return ["sync", "codistill"] if self.mode == "both" else [self.mode]

    # The "auto" decisions, all taken in one `_decisions()`.
    def resolved_kind(self) -> str:
        """The exchange kind: predictions, weights or average."""
        return self._decisions().kind

    def resolved_transport(self) -> str:
        """How the exchange travels: local, horovod or directory."""
        return self._decisions().transport

    def resolved_alpha(self) -> float:
        return default_alpha(self.exchange) if self.alpha is None else self.alpha

    def resolved_data_mode(self) -> str:
        return self._decisions().data_mode

    def separate_group(self) -> bool:
        """This job trains one group and meets the others in --exchange_dir."""
        return self._decisions().transport == "directory"

    def deprecations(self) -> list[str]:
        """One line per setting written in a spelling that is still accepted but replaced."""
        if self.exchange not in LEGACY_EXCHANGES:
            return []
        transport = self.transport if self.transport != "auto" else LEGACY_EXCHANGES[self.exchange]
        new = "--exchange=predictions" + ("" if transport == "auto" else f" --transport={transport}")
        return [f"--exchange={self.exchange} is deprecated; it means {new}."]

    def _decisions(self) -> _Decisions:
        from tf_codistill import topology

        # horovodrun / MPIJob, or a TFJob of several workers (bootstrapped by start_runtime)
        launched = topology.multi_process_launch()
        kind, transport = self.exchange, self.transport
        if kind in LEGACY_EXCHANGES:
            kind = "predictions"
            if transport == "auto":
                transport = LEGACY_EXCHANGES[self.exchange]
        if transport == "auto":
            transport = "directory" if self.exchange_dir is not None else "horovod" if launched else "local"
        data_mode = self.data_mode
        if data_mode == "auto":
            data_mode = "shared" if kind == "predictions" and transport == "horovod" else "independent"
        return _Decisions(launched=launched, kind=kind, transport=transport, data_mode=data_mode)

    def validate(self) -> None:
        """Checks every setting, then how they combine.

        Raises:
            TypeError: a value of the wrong type (e.g. a string for a number).
            ValueError: a bad value or combination; the message names the
                flag and says what to do instead.
        """
        for name in SETTINGS:
            check_setting(name, getattr(self, name))
        from tf_codistill.config_checks import check_combinations

        check_combinations(self, self._decisions())
        self._check_registries()

    def model_options(self) -> dict:
        """The builder options of --model (the Transformer's shape)."""
        if self.model != "transformer":
            return {}
        return {"layers": self.layers, "heads": self.heads, "width": self.width, "dropout": self.dropout}

    def _check_registries(self) -> None:
        """Names looked up in registries that load Keras (checked last, so
        that every other mistake is reported without loading it)."""
        from models import MODELS

        if self.model not in MODELS:
            raise ValueError(f"Unknown model {self.model!r}. Choose one of {sorted(MODELS)}.")

    def run_length(self, num_train: int) -> tuple[int, int, int]:
        """(steps per epoch, updates per model, epochs) on `num_train` examples.

        An epoch is `num_train // batch_size` steps (at least 1), or the whole
        run where that is shorter. With `--steps` > 0 the run is exactly
        `steps` updates, its last epoch shorter where `steps` is not a
        multiple of an epoch; otherwise it is `epochs` whole epochs. `epochs`
        counts the epochs begun: ceil(updates / steps per epoch).
        """
        one_pass = self.steps_per_epoch or max(1, num_train // self.batch_size)
        total = self.steps if self.steps > 0 else self.epochs * one_pass
        steps_per_epoch = max(1, min(one_pass, total))
        epochs = max(1, math.ceil(total / steps_per_epoch))
        return steps_per_epoch, total, epochs

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
        warmup = self.warmup_steps or int(round(self.warmup_epochs * steps_per_epoch))
        if warmup >= total:
            given = (
                f"--warmup_steps={warmup}" if self.warmup_steps else f"--warmup_epochs={self.warmup_epochs:g}"
            )
            warnings.append(
                f"{given} is {warmup} steps, not shorter than the run "
                f"({total} steps): it is cut to {max(total - 1, 0)} steps, so the learning rate peaks only "
                "at the last step. Shorten the warmup."
            )
        if (
            self.mode != "sync"
            and self.alpha_ramp_steps
            and self.burn_in_steps + self.alpha_ramp_steps > total
        ):
            warnings.append(
                f"--burn_in_steps + --alpha_ramp_steps = {self.burn_in_steps + self.alpha_ramp_steps} "
                f"steps, longer than the run ({total} steps): alpha never reaches {self.resolved_alpha():g}."
            )
        return warnings


def default_alpha(exchange: str) -> float:
    """--alpha when not given: 0 with --exchange=average (pure DiLoCo), else 1."""
    return 0.0 if exchange == "average" else 1.0


@dataclasses.dataclass(frozen=True)
class _Decisions:
    """The "auto" settings resolved for this process."""

    launched: bool  # under horovodrun / an MPIJob, or a TFJob of several workers
    kind: str  # predictions, weights or average
    transport: str  # local, horovod or directory
    data_mode: str  # shared or independent


SETTINGS: dict[str, Setting] = settings_of(TrainConfig)
"""Every setting by name, in declaration order."""


def check_setting(name: str, value) -> None:
    """`check_value` of setting `name`. Raises KeyError for an unknown name,
    TypeError or ValueError (naming the flag) for a bad value."""
    check_value(SETTINGS[name], value)


def parse_setting(name: str, text: str):
    """The value of setting `name` written as `text` on a command line.
    Raises KeyError for an unknown name, ValueError for bad text."""
    return parse_value(SETTINGS[name], text)


def define_flags(flag_values=None) -> None:
    """Defines one absl flag per setting on `flag_values` (absl's global `FLAGS` by default)."""
    from absl import flags

    define_absl_flags(SETTINGS.values(), flags.FLAGS if flag_values is None else flag_values)


# Learning-rate milestones as fractions of the run (schedules.MILESTONE_PRESETS
# is this dict; it lives here so that reading them needs no Keras). "goyal" is
# ResNet-50's 30/60/80 of 90 epochs (the sync protocol; halving epochs and
# milestones together keeps the fractions, the paper's "out of the box"
# codistillation); "delayed" is the paper's fix for codistillation, 18/38/44 of 45 epochs.
MILESTONE_PRESETS = {
    "goyal": (30 / 90, 60 / 90, 80 / 90),
    "delayed": (18 / 45, 38 / 45, 44 / 45),
}
MILESTONE_NAMES = tuple(MILESTONE_PRESETS)


def parse_milestones(text: str, flag: str = "lr_milestones") -> tuple[float, ...]:
    """Learning-rate milestones as fractions of the run, from a preset name or
    comma-separated fractions. Raises ValueError naming `--flag`."""
    if text in MILESTONE_NAMES:
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
            f"--{flag}={text!r}: give {' or '.join(MILESTONE_NAMES)} or increasing fractions "
            "of the run in (0, 1), e.g. 0.4,0.84,0.98."
        )
    return values
