"""Runs the arms of a comparison: plan, build, train, evaluate, gather."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time

import keras

from tf_codistill import backup as backup_mod
from tf_codistill.config import TrainConfig, parse_milestones
from tf_codistill.report import EpochLine, _traffic, format_table, keras_verbose, plot_histories


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
    callbacks.append(EpochLine(epochs, verbose))  # --verbose=2: one short line per epoch
    start = time.perf_counter()
    history = model.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds,
        callbacks=callbacks,
        verbose=keras_verbose(verbose),
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
