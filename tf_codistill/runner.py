"""Runs the arms of a comparison: plan, build, train, evaluate, gather."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import keras

from tf_codistill import backup as backup_mod
from tf_codistill import files, seeds
from tf_codistill import runtime as runtime_mod
from tf_codistill.config import TrainConfig, parse_milestones
from tf_codistill.preemption import Preempted, PreemptionHandler
from tf_codistill.report import (
    EPOCH_LINE_KEYS,
    TEXT_LINE_KEYS,
    EpochLine,
    EpochTimer,
    _traffic,
    format_table,
    keras_verbose,
    plot_histories,
)
from tf_codistill.results import GroupResult, RankResult, RunResult, results_json
from tf_codistill.run_callbacks import ResumableCSVLogger, StepLogger, StopAtStep, StopAtTarget


# --------------------------------------------------------------------------- arms
def _arm_schedules(config: TrainConfig, arm: str, batch: int, total_steps: int, steps_per_epoch: int):
    """Learning-rate schedule, weight decay and alpha for one arm whose models
    each train on `batch` examples per step (ArmPlan.batch decides that)."""
    from tf_codistill import schedules

    peak = config.lr if config.lr > 0 else schedules.goyal_learning_rate(config.base_lr, batch)
    warmup = config.warmup_steps or int(round(config.warmup_epochs * steps_per_epoch))
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
        lr = schedules.WarmupCosineDecay(peak, total_steps, warmup, final_fraction=config.lr_floor)
    else:
        lr = schedules.WarmupPiecewiseDecay(peak, [], 0.1, warmup)
    if config.optimizer == "adamw":  # decoupled, in the optimizer
        wd = 0.0
    elif wd_kind == "paper" and config.weight_decay > 0:
        wd = schedules.paper_weight_decay(boundaries, (config.weight_decay, config.weight_decay / 10, 0.0))
    else:
        wd = config.weight_decay
    alpha = schedules.AlphaSchedule(config.resolved_alpha(), config.burn_in_steps, config.alpha_ramp_steps)
    return lr, wd, alpha


def target_results(history: dict, plan: ArmPlan, target: float) -> dict:
    """results.json's figures for --target_accuracy: the updates at the first
    evaluation at or above it, for the groups' pooled accuracy and the ensemble."""
    from tf_codistill.selection import updates_to_target

    out = {"target_accuracy": target}
    for key, name in (
        ("val_accuracy", "updates_to_target"),
        ("val_ensemble_accuracy", "ensemble_updates_to_target"),
    ):
        curve = [float(v) for v in history.get(key, [])]
        if curve:
            updates = [min((i + 1) * plan.steps_per_epoch, plan.total_steps) for i in range(len(curve))]
            out[name] = updates_to_target(curve, updates, target)
    if history.get("val_accuracy"):
        out["final_val_accuracy"] = float(history["val_accuracy"][-1])
    return out


# ------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class ArmPlan:
    """Everything decided about one arm before anything is built."""

    arm: str
    runtime: runtime_mod.Runtime
    batch: int  # examples per model (group) per step
    steps_per_epoch: int
    total_steps: int  # updates per model, exactly
    epochs: int
    directory: str
    tag: str  # "" in one process, ".rank<r>" in a job: per-process log names
    writes_logs: bool  # the group's chief writes TensorBoard and the CSV

    @property
    def groups(self) -> int:
        return self.runtime.num_groups


def arm_runtime(config: TrainConfig, arm: str) -> runtime_mod.Runtime:
    """The runtime of one arm: joins the job on the first call in a
    multi-process launch (before any other TensorFlow op)."""
    kind, transport = config.resolved_kind(), config.resolved_transport()
    codistill = arm == "codistill"
    separate = codistill and transport == "directory"
    local_predictions = codistill and kind == "predictions" and transport == "local"
    return runtime_mod.init(
        num_groups=config.num_groups if codistill else 1,
        collective_implementation=config.collective_implementation,
        precision=config.precision,
        tpu=config.tpu,
        exchange=kind,
        transport=transport if codistill else "auto",
        exchange_every=config.exchange_every,
        exchange_dir=config.exchange_dir if separate else None,
        group=config.group if separate else None,
        data_mode=config.resolved_data_mode() if local_predictions else None,
        seed=config.seed,
        peer_timeout=config.peer_timeout,
        on_stale=config.on_stale,
        outer_learning_rate=config.outer_lr,
        outer_momentum=config.outer_momentum,
        average_teacher=config.average_teacher,
        collective_timeout=config.collective_timeout,
    )


def plan_arm(config: TrainConfig, arm: str, rt: runtime_mod.Runtime, num_train: int, workdir: str) -> ArmPlan:
    steps_per_epoch, total_steps, epochs = config.run_length(num_train)
    return ArmPlan(
        arm=arm,
        runtime=rt,
        batch=config.batch_size // rt.num_groups,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
        directory=os.path.join(workdir, arm),
        tag=f".rank{rt.rank}" if rt.distributed else "",
        writes_logs=rt.is_group_chief,
    )


# ------------------------------------------------------------------------ build
def _train_data(config: TrainConfig, spec, plan: ArmPlan, skip: int):
    from tf_codistill import data

    def dataset_fn(seed):
        return data.train_batches(spec, plan.batch, seed, config.data_dir, skip_batches=skip)

    return plan.runtime.dataset(dataset_fn)


def _test_data(config: TrainConfig, spec, rt: runtime_mod.Runtime, split: str | None = None):
    """The evaluation split (`split`, default the test split), for this process."""
    from tf_codistill import data

    batch = 256 if spec.is_text else 1000  # windows of `context` positions, or examples
    if not rt.distributed:
        return data.eval_batches(spec, batch, config.data_dir, split=split)
    total = spec.num_test if split in (None, spec.test_split) else spec.num_validation
    usable = total - total % rt.group_size  # equal shards: equal step counts

    def dataset_fn(context):
        shard = (context.input_pipeline_id, context.num_input_pipelines)
        return data.eval_batches(spec, batch // 2, config.data_dir, shard=shard, limit=usable, split=split)

    return rt.eval_dataset(dataset_fn)


def _optimizer(config: TrainConfig, lr):
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    if config.optimizer == "lamb":
        return keras.optimizers.Lamb(lr)
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay, beta_2=0.99)
        # Kernels and embeddings decay; biases, LayerNorm scales and offsets do not.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer
    return keras.optimizers.Adam(lr)


def default_model_fn(config: TrainConfig):
    """`(spec, seed) -> keras.Model` from the `models/` registry (--model)."""
    from models import build_model

    def model_fn(spec, seed):
        return build_model(
            config.model, spec.input_shape, spec.num_classes, seed=seed, **config.model_options()
        )

    return model_fn


def run_arm(config: TrainConfig, plan: ArmPlan, spec, model_fn=None):
    """Trains and evaluates one arm. Returns (its `RunResult`, history,
    backup); in a multi-process job the result describes this process's group."""
    from models import count_params
    from tf_codistill import CodistillModel

    rt = plan.runtime
    custom_model = model_fn is not None
    model_fn = model_fn or default_model_fn(config)
    lr, wd, alpha = _arm_schedules(config, plan.arm, plan.batch, plan.total_steps, plan.steps_per_epoch)
    files.makedirs(plan.directory)
    timer = EpochTimer()
    backup = _make_backup(config, plan, timer)
    # A resumed run reads on from where the backup ended (mid-epoch too).
    skip = backup.resume_step() if backup is not None else 0

    # Datasets first: tf.data shuffles depend on TF's global seed too, which
    # building each member with its own seed changes.
    keras.utils.set_random_seed(config.seed)
    train_ds = _train_data(config, spec, plan, skip)
    test_ds = _test_data(config, spec, rt)
    # Validation during training (where choices are made; text, fresh data, --validation_fraction),
    # test at the end.
    val_ds = _test_data(config, spec, rt, spec.validation_split) if spec.validation_split else test_ds
    with rt.scope():
        exchange = rt.exchange()
        members = rt.members(lambda g: model_fn(spec, seeds.group_seed(config.seed, g, "init")))
        model = CodistillModel(
            members,
            distance=config.distance,
            temperature=config.temperature,
            alpha=alpha,
            data_mode=rt.data_mode,
            exchange=exchange,
            weight_decay=wd,
            num_classes=spec.num_classes,
            clip_norm=config.clip_norm or None,  # per member: each as if trained alone
            name=plan.arm,
        )
        model.compile(
            optimizer=_optimizer(config, lr),
            metrics=["accuracy"],
            steps_per_execution=config.steps_per_execution,
        )

    # The timer first: it puts epoch_seconds into the epoch logs that the
    # backup, the CSV and TensorBoard see. Then the backup: it restores the
    # step before the loggers open their files, and they rewrite them to end
    # where the backup does.
    callbacks = [timer] + ([backup] if backup is not None else [])
    callbacks.append(StopAtStep(plan.total_steps))
    if config.stop_at_target:
        callbacks.append(StopAtTarget(config.target_accuracy))
    if plan.writes_logs:
        tb_dir = os.path.join(plan.directory, "tensorboard")
        if rt.distributed:
            tb_dir = os.path.join(tb_dir, f"group{rt.group}")
        callbacks += [
            keras.callbacks.TensorBoard(tb_dir, update_freq=max(1, plan.steps_per_epoch // 4)),
            ResumableCSVLogger(os.path.join(plan.directory, f"history{plan.tag}.csv"), backup),
        ]
    callbacks.append(StepLogger(os.path.join(plan.directory, f"steps{plan.tag}.jsonl"), backup))
    verbose = config.verbose if rt.is_chief else 0
    callbacks.append(EpochLine(plan.epochs, verbose, TEXT_LINE_KEYS if spec.is_text else EPOCH_LINE_KEYS))
    # Last: it backs up a step once every callback has seen the step before.
    callbacks.append(PreemptionHandler(backup, agree=rt.max_over_job if rt.distributed else None))
    where = f"rank {rt.rank} (group {rt.group}) " if rt.distributed else ""
    print(
        f"[{plan.arm}] {where}{plan.groups} group(s) x batch {plan.batch}, {plan.total_steps} updates per "
        f"model ({plan.epochs} epochs of {plan.steps_per_epoch} steps), {members[0].name} on {spec.name}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        history = model.fit(
            train_ds,
            epochs=plan.epochs,
            steps_per_epoch=plan.steps_per_epoch,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=keras_verbose(verbose),
            shuffle=False,
        ).history
    except Preempted:
        # fit's on_train_end did not run: stop the exchange's threads (a
        # directory's pending snapshot is written), but publish no final one.
        if exchange is not None and hasattr(exchange, "close"):
            exchange.close()
        raise
    wall = time.perf_counter() - start
    if backup is not None:
        # Every epoch's logs, the ones before a resume included.
        history = backup.history
        timer.seconds += backup.restored_extra.get("train_seconds", 0.0)
        wall += backup.restored_extra.get("wall_seconds", 0.0)
    final = model.evaluate(test_ds, verbose=0, return_dict=True)

    num_params = count_params(members[0])
    per_group = []
    for i, g in enumerate(rt.local_groups):
        prefix = f"g{i}_" if len(rt.local_groups) > 1 else ""
        per_group.append(
            GroupResult(
                group=g,
                test_accuracy=float(final[f"{prefix}accuracy"]),
                test_loss=float(final[f"{prefix}loss"]),
                train_loss=float(history[f"{prefix}task_loss"][-1]),
            )
        )
    steps_run = int(model.optimizer.iterations.numpy())
    in_group, cross_group, sent, equivalent = _traffic(
        config, rt, exchange, plan.groups, plan.batch, spec, num_params
    )
    ensemble = final.get("ensemble_accuracy")
    if spec.is_text:
        from tf_codistill.text_data import generate

        _add_text_results(per_group, final, history, plan.groups > 1 and len(rt.local_groups) > 1)
        for group, member in zip(per_group, members):
            group.sample = generate(member, spec, seed=config.seed)
    entry = RunResult(
        arm=plan.arm,
        num_groups=plan.groups,
        world_size=rt.world_size,
        exchange=(exchange.name if exchange else "local")
        if plan.groups > 1
        else ("allreduce" if rt.world_size > 1 else "none"),
        data_mode=rt.data_orders if plan.groups > 1 else "shared",
        dataset=spec.name,
        model=members[0].name if custom_model else config.model,
        seed=config.seed,
        precision=config.precision,
        steps=steps_run,
        epochs=plan.epochs,
        steps_per_epoch=plan.steps_per_epoch,
        batch_size_per_group=plan.batch,
        groups=per_group,
        ensemble_test_accuracy=float(ensemble) if ensemble is not None and plan.groups > 1 else None,
        **(_ensemble_text_results(final, history) if spec.is_text and "ensemble_loss" in final else {}),
        bytes_sent_per_step=float(sent),
        bytes_in_group_per_step=float(in_group),
        bytes_cross_group_per_step=float(cross_group),
        bytes_equivalent_per_step=float(equivalent),
        params_per_model=num_params,
        examples_per_second=steps_run * plan.batch * len(rt.local_groups) / max(timer.seconds, 1e-9),
        wall_seconds=wall,
        train_seconds=timer.seconds,
    )
    if rt.distributed:
        entry.examples_per_second = steps_run * config.batch_size / max(timer.seconds, 1e-9)
        entry.weights_checksum = float(
            sum(float(v.numpy().astype("float64").sum()) for v in members[0].weights)
        )
        if os.path.isdir("/proc/self/task"):
            entry.threads = len(os.listdir("/proc/self/task"))
    if config.target_accuracy:
        for key, value in target_results(history, plan, config.target_accuracy).items():
            setattr(entry, key, value)
    if plan.groups > 1:
        entry.distance, entry.alpha, entry.temperature = (
            config.distance,
            config.resolved_alpha(),
            config.temperature,
        )
    if exchange is not None and exchange.name == "weights":
        entry.exchange = f"weights/{exchange.transport.name}"
        entry.exchange_every = config.exchange_every
        entry.staleness_max = max(history.get("staleness", [0.0]))
        entry.peer_refreshes = exchange.refreshes
        entry.peer_refresh_seconds = exchange.refresh_seconds
        entry.peer_bytes_received = exchange.bytes_received
    if exchange is not None and exchange.name == "average":
        entry.exchange_every = config.exchange_every
        entry.outer_lr, entry.outer_momentum = config.outer_lr, config.outer_momentum
        entry.average_teacher = exchange.teacher
        entry.outer_steps, entry.outer_seconds = exchange.outer_steps, exchange.outer_seconds
    if backup is not None:
        entry.resumed_from_epoch = backup.restored_epoch
        entry.resumed_from_step = backup.restored_step if backup.restored_epoch is not None else None
        entry.backup_seconds = backup.save_seconds
    if plan.writes_logs:
        text = json.dumps({k: [float(v) for v in vs] for k, vs in history.items()}, indent=1)
        files.write_atomic(os.path.join(plan.directory, f"history{plan.tag}.json"), text.encode())
    return entry, history, backup


def _add_text_results(per_group: list[GroupResult], final: dict, history: dict, several: bool) -> None:
    """Language-model figures per group: validation NLL (nats per character)
    at the end and at its best epoch, test NLL, and their perplexities."""
    for i, group in enumerate(per_group):
        prefix = f"g{i}_" if several else ""
        curve = [float(v) for v in history[f"val_{prefix}loss"]]
        group.val_loss = curve[-1]
        group.best_val_loss = min(curve)
        group.best_val_epoch = curve.index(min(curve)) + 1
        group.test_perplexity = math.exp(group.test_loss)
        group.val_perplexity = math.exp(curve[-1])


def _ensemble_text_results(final: dict, history: dict) -> dict:
    """`RunResult`'s ensemble NLL fields (language models), by name."""
    curve = [float(v) for v in history.get("val_ensemble_loss", [])]
    out = {"ensemble_test_loss": float(final["ensemble_loss"])}
    if curve:
        out.update(ensemble_val_loss=curve[-1], ensemble_best_val_loss=min(curve))
    return out


def _make_backup(config: TrainConfig, plan: ArmPlan, timer: EpochTimer):
    """This process's `Backup` (None with --backup_keep=0). Processes of one
    job each keep their own and agree on the epoch to resume from."""
    if config.backup_keep == 0:
        return None
    rt = plan.runtime
    directory = os.path.join(plan.directory, "backup")
    agree = None
    if rt.distributed:
        directory = os.path.join(directory, f"rank{rt.rank}")
        agree = rt.agree_on_epoch
    elif rt.separate_group:
        directory = os.path.join(directory, f"group{rt.group}")
    started = time.perf_counter()
    backup = None

    def extra():
        restored = backup.restored_extra if backup is not None else {}
        return {
            "train_seconds": timer.seconds + restored.get("train_seconds", 0.0),
            "wall_seconds": time.perf_counter() - started + restored.get("wall_seconds", 0.0),
        }

    backup = backup_mod.Backup(
        directory,
        keep=config.backup_keep,
        agree=agree,
        extra=extra,
        delete_on_finish=False,
        every_steps=config.backup_every_steps,
    )
    try:
        backup.check_writable()
    except backup_mod.BackupError as e:
        raise ValueError(str(e)) from e
    return backup


# -------------------------------------------------------------------------- run
def train_and_evaluate(config: TrainConfig, workdir: str, model_fn=None) -> dict:
    """Runs the configured arms and writes results.json, the plot and logs.
    Returns what results.json holds (`tf_codistill.results` declares it).

    In a multi-process launch (horovodrun, the project launcher, a TFJob)
    this process joins the job and trains its group's model; rank 0 gathers
    every group's results and writes the files.

    Args:
        config: the settings (`config.validate()` is called here).
        workdir: where results, logs and plots go.
        model_fn: `(spec, seed) -> keras.Model` building one member; default
            the `models/` registry entry named by `config.model`.

    Raises:
        ValueError: a bad setting, before anything is trained.
    """
    config.validate()
    arms = config.arms()
    # Joins a multi-process job before any other TensorFlow op (one arm per job).
    runtimes = {arm: arm_runtime(config, arm) for arm in arms}
    first = runtimes[arms[0]]
    from tf_codistill import data

    spec = data.load_spec(
        config.dataset, config.data_dir, config.train_fraction, config.context, config.validation_fraction
    )
    if spec.num_train < config.batch_size:
        raise ValueError(
            f"--batch_size={config.batch_size} is larger than the training set ({spec.num_train} "
            "examples); lower it or raise --train_fraction."
        )
    for warning in config.check_run_length(spec.num_train):
        if first.is_chief:
            print(f"train.py: warning: {warning}", file=sys.stderr, flush=True)
    if config.batch_size % first.world_size:
        raise ValueError(
            f"--batch_size={config.batch_size} is not divisible by the {first.world_size} workers; "
            "every worker takes batch_size / workers examples per step."
        )
    if first.group_size > 1 and config.steps_per_execution > 1:
        raise ValueError(
            "--steps_per_execution > 1 fails inside Keras 3.15 under MultiWorkerMirroredStrategy "
            "(a placeholder in the multi-step loop is never fed); use 1 for groups of several workers."
        )
    custom_model_fn = model_fn
    model_fn = model_fn or default_model_fn(config)
    probe = model_fn(spec, 0)
    data.check_labels(spec, int(probe.outputs[0].shape[-1]), config.data_dir)
    del probe

    files.makedirs(workdir)
    if first.is_chief:
        files.write_atomic(
            os.path.join(workdir, "config.json"), json.dumps(dataclasses.asdict(config), indent=1).encode()
        )
    runs, histories, backups = [], {}, []
    for arm in arms:
        plan = plan_arm(config, arm, runtimes[arm], spec.num_train, workdir)
        entry, history, backup = run_arm(config, plan, spec, custom_model_fn)
        if plan.runtime.distributed:
            entry = _merge_ranks(entry, plan.runtime)
        runs.append(entry)
        histories[arm] = history
        backups.append(backup)
    results = {"runs": [run.to_dict() for run in runs]}
    if first.is_chief:
        files.write_atomic(os.path.join(workdir, "results.json"), results_json(runs).encode())
        plot_histories(
            histories, os.path.join(workdir, "comparison.png"), "loss" if spec.is_text else "accuracy"
        )
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


def _merge_ranks(entry: RunResult, rt: runtime_mod.Runtime) -> RunResult:
    """Gathers every rank's entry; one entry for the job, groups from the
    group chiefs, per-rank weight checksums under `ranks`."""
    everyone = rt.gather((rt.rank, rt.group, rt.is_group_chief, entry))
    chiefs = sorted(((group, e) for _, group, chief, e in everyone if chief), key=lambda item: item[0])
    return dataclasses.replace(
        entry,
        groups=[e.groups[0] for _, e in chiefs],
        weights_checksum=None,
        threads=None,
        wall_seconds=max(e.wall_seconds for *_, e in everyone),
        train_seconds=max(e.train_seconds for *_, e in everyone),
        examples_per_second=min(e.examples_per_second for *_, e in everyone),
        ranks=[
            RankResult(rank=rank, group=group, weights_checksum=e.weights_checksum, threads=e.threads)
            for rank, group, _, e in sorted(everyone, key=lambda item: item[0])
        ],
    )
