"""How `TrainConfig`'s settings combine: the checks that take more than one
setting (each value alone is checked by its declaration in config.py). Every
refusal names the flags and says what to write instead."""

from __future__ import annotations

from tf_codistill import seeds
from tf_codistill.config import (
    FRESH_DATASETS,
    LEGACY_EXCHANGES,
    MILESTONE_NAMES,
    TEXT_DATASETS,
    TrainConfig,
    check_directory,
    parse_milestones,
)

__all__ = ["check_combinations"]


def bad(message: str):
    raise ValueError(message)


def check_combinations(cfg: TrainConfig, plan) -> None:
    """Raises ValueError on the first combination of settings that cannot
    run; `plan` is the config's resolved "auto" decisions (`_Decisions`)."""
    if cfg.mode != "sync" and cfg.num_groups < 2:
        bad(
            f"--num_groups={cfg.num_groups}: codistillation needs at least 2 groups (use --mode=sync for one)."
        )
    legacy = LEGACY_EXCHANGES.get(cfg.exchange, "auto")
    if legacy != "auto" and cfg.transport not in ("auto", legacy):
        bad(
            f"--exchange={cfg.exchange} with --transport={cfg.transport}: write "
            f"--exchange=predictions --transport={cfg.transport}."
        )
    if plan.transport == "horovod" and not plan.launched:
        groups = 1 if cfg.mode == "sync" else cfg.num_groups
        mode = "sync" if cfg.mode == "sync" else "codistill"
        bad(
            "--transport=horovod runs one process per worker, and this process was not started as "
            f"one: launch it with `python -m tf_codistill.launch --np {2 * groups} --groups {groups} "
            f"-- train.py --mode={mode} ...` (or horovodrun), or leave --transport at auto to train "
            "every group in this process."
        )
    if plan.transport == "local" and plan.launched:
        bad(
            "--transport=local trains every group in one process, and this process was started as "
            "one of several: leave --transport at auto (horovod) or launch a single process."
        )
    if cfg.exchange_dir is not None:
        if plan.kind != "weights":
            bad("--exchange_dir is for the stale-weights exchange: add --exchange=weights.")
        if plan.transport != "directory":
            bad(f"--exchange_dir is the directory transport: drop --transport={cfg.transport}.")
        check_directory("exchange_dir", cfg.exchange_dir)
    elif plan.transport == "directory":
        bad("--transport=directory needs the shared directory: add --exchange_dir=PATH.")
    if plan.transport == "directory":
        if cfg.mode != "codistill":
            bad("--exchange_dir runs one codistillation group per job: use --mode=codistill.")
        if not 0 <= cfg.group < cfg.num_groups:
            bad(
                f"--group={cfg.group}: with --exchange_dir each job trains one group; "
                f"pass --group in [0, {cfg.num_groups})."
            )
    elif cfg.group != -1:
        bad("--group only applies with --exchange=weights --exchange_dir=...")
    if plan.transport != "local":  # a multi-process job, or one job per group
        if cfg.mode == "both":
            bad(
                "--mode=both runs both arms in one process; a multi-process job runs one arm. "
                "Launch --mode=sync and --mode=codistill separately."
            )
        if plan.kind == "predictions" and cfg.mode == "codistill" and plan.data_mode == "independent":
            bad(
                "--transport=horovod swaps predictions on the same examples every step, which "
                "needs --data_mode=shared; independent data orders need the stale-weights exchange."
            )
        if plan.kind in ("weights", "average") and cfg.mode == "codistill" and cfg.data_mode == "shared":
            bad(
                f"--data_mode=shared: with --exchange={plan.kind} across jobs or processes every "
                "group draws its own data order; use --data_mode=independent (or auto)."
            )
    if plan.kind == "average" and cfg.mode != "sync":
        if cfg.data_mode == "shared":
            bad("--data_mode=shared: averaged islands reading the same batches stay identical; use auto.")
        if cfg.exchange_every < 1 or cfg.exchange_every % cfg.steps_per_execution:
            bad(
                "--exchange=average needs --exchange_every >= 1, a multiple of --steps_per_execution: "
                "the steps between outer steps, which run between compiled calls."
            )
    if cfg.tpu is not None:
        if plan.launched:
            bad("--tpu: a TPU group is one process driving its TPU; start it without a launcher.")
        if cfg.mode == "both" or (cfg.mode == "codistill" and plan.transport != "directory"):
            bad(
                "--tpu: Horovod does not run on TPUs, so each TPU job trains one group and the groups "
                "meet in storage: use --mode=codistill --exchange=weights --exchange_dir=gs://... "
                "--group=G (or --mode=sync)."
            )
    if cfg.data_dir is not None:
        check_directory("data_dir", cfg.data_dir, must_write=False)
    if cfg.mode != "sync" and cfg.batch_size % cfg.num_groups:
        bad(
            f"--batch_size={cfg.batch_size} is not divisible by --num_groups={cfg.num_groups}; "
            "each group takes batch_size / num_groups examples per step."
        )
    if cfg.backup_every_steps and cfg.backup_keep == 0:
        bad("--backup_every_steps needs backups: leave --backup_keep at 1 or more.")
    if cfg.backup_every_steps and cfg.steps_per_execution > 1:
        bad("--backup_every_steps backs up between steps, which needs --steps_per_execution=1.")
    if cfg.epochs < 1 and cfg.steps < 1:
        bad("Set --epochs >= 1 or --steps >= 1.")
    if cfg.num_groups > seeds.MAX_GROUPS:
        bad(
            f"--num_groups={cfg.num_groups}: at most {seeds.MAX_GROUPS} (a group is one base-1000 digit of its seed)."
        )
    max_seed = seeds.max_seed(cfg.num_groups)
    if not 0 <= cfg.seed <= max_seed:
        bad(
            f"--seed must be in [0, {max_seed}], got {cfg.seed}: group g's model is seeded "
            "with seed * 1000 + g, which must fit in 32 bits."
        )
    if cfg.lr_schedule != "step":
        if cfg.lr_milestones != "goyal":
            bad(f"--lr_milestones only applies to --lr_schedule=step, not {cfg.lr_schedule}.")
        if cfg.codistill_lr_milestones is not None:
            bad(f"--codistill_lr_milestones only applies to --lr_schedule=step, not {cfg.lr_schedule}.")
        for name in ("wd_schedule", "codistill_wd_schedule"):
            if getattr(cfg, name) == "paper":
                bad(f"--{name}=paper follows the step schedule's decays; use --lr_schedule=step.")
    if cfg.mode == "sync":
        for name in ("codistill_lr_milestones", "codistill_wd_schedule"):
            if getattr(cfg, name) is not None:
                bad(f"--{name} applies to the codistillation arm only, and --mode=sync has none.")
    for arm in cfg.arms():
        milestones_flag = "lr_milestones"
        wd_flag = "wd_schedule"
        if arm == "codistill":
            if cfg.codistill_lr_milestones is not None:
                milestones_flag = "codistill_lr_milestones"
            if cfg.codistill_wd_schedule is not None:
                wd_flag = "codistill_wd_schedule"
        milestones = getattr(cfg, milestones_flag)
        two = milestones in MILESTONE_NAMES or len(parse_milestones(milestones)) >= 2  # presets: 3
        if getattr(cfg, wd_flag) == "paper" and not two:
            bad(
                f"--{wd_flag}=paper changes weight decay at the first two lr decays, but "
                f"--{milestones_flag}={milestones!r} has one; give at least two milestones."
            )

    if cfg.dataset in FRESH_DATASETS and (cfg.steps < 1 or cfg.steps_per_epoch < 1):
        bad(
            f"--dataset={cfg.dataset} is an endless stream of fresh examples: give the run's length "
            "with --steps and the updates between evaluations with --steps_per_epoch (e.g. 25)."
        )
    if cfg.stop_at_target and not cfg.target_accuracy:
        bad("--stop_at_target=1 needs --target_accuracy in (0, 1].")
    if cfg.stop_at_target and (plan.launched or plan.transport == "directory"):
        bad(
            "--stop_at_target=1 runs in one process only: groups in separate processes would stop at "
            "different steps. Leave it at 0 (results.json still records the updates to the target)."
        )
    text = cfg.dataset in TEXT_DATASETS
    if text != (cfg.model == "transformer"):
        bad(
            f"--dataset={cfg.dataset} with --model={cfg.model}: the text datasets "
            f"({', '.join(TEXT_DATASETS)}) go with --model=transformer, and it with them."
        )
    if cfg.model == "transformer" and cfg.width % cfg.heads:
        bad(f"--width={cfg.width} is not divisible by --heads={cfg.heads}; pick heads that divide it.")
    if cfg.optimizer == "adamw" and "paper" in (cfg.wd_schedule, cfg.codistill_wd_schedule):
        bad("--optimizer=adamw decays weights itself, at a constant rate: use --wd_schedule=constant.")
    if cfg.validation_fraction and (cfg.dataset in TEXT_DATASETS or cfg.dataset in FRESH_DATASETS):
        bad(
            f"--validation_fraction={cfg.validation_fraction:g}: {cfg.dataset} has its own validation split; "
            "leave it at 0."
        )
    if cfg.validation_fraction >= 1:
        bad(
            f"--validation_fraction={cfg.validation_fraction:g} leaves nothing to train on: give a value in [0, 1)."
        )
    if cfg.average_teacher != "shared":
        if plan.kind != "average" or cfg.mode == "sync":
            bad(
                f"--average_teacher={cfg.average_teacher} applies to --exchange=average only; leave it at shared."
            )
