"""Input validation: every bad flag or argument fails at start-up with a
message that names it (train.py: one `train.py: error:` line, exit 2)."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, python_env

import train

NAN, INF = float("nan"), float("inf")
WEIGHTS_DIR = dict(exchange="weights", exchange_dir="/tmp/tf_codistill-x", mode="codistill", group=0)
NOT_LAUNCHED = "launch it with `python -m tf_codistill.launch --np 4 --groups 2 -- train.py --mode=codistill"

# (overrides of the default TrainConfig, exception, message substring)
BAD_CONFIGS = [
    # wrong types (from Python; absl parses flags into the right types)
    (dict(num_groups="2"), TypeError, "--num_groups must be an integer, got '2'"),
    (dict(batch_size=64.0), TypeError, "--batch_size must be an integer"),
    (dict(steps=True), TypeError, "--steps must be an integer, got True"),
    (dict(alpha="1"), TypeError, "--alpha must be a number"),
    (dict(dataset=None), TypeError, "--dataset must be a string"),
    # NaN and infinity
    (dict(alpha=NAN), ValueError, "--alpha must be a finite number, got nan"),
    (dict(alpha=INF), ValueError, "--alpha must be a finite number, got inf"),
    (dict(base_lr=INF), ValueError, "--base_lr must be a finite number"),
    (dict(base_lr=NAN), ValueError, "--base_lr must be a finite number"),
    (dict(weight_decay=NAN), ValueError, "--weight_decay must be a finite number"),
    (dict(warmup_epochs=INF), ValueError, "--warmup_epochs must be a finite number"),
    (dict(temperature=INF), ValueError, "--temperature must be a finite number"),
    (dict(temperature=NAN), ValueError, "--temperature must be a finite number"),
    (dict(peer_timeout=NAN), ValueError, "--peer_timeout must be a finite number"),
    (dict(collective_timeout=INF), ValueError, "--collective_timeout must be a finite number"),
    (dict(train_fraction=NAN), ValueError, "--train_fraction must be a finite number"),
    # out of range
    (dict(num_groups=0), ValueError, "--num_groups must be >= 1"),
    (dict(num_groups=1), ValueError, "codistillation needs at least 2 groups"),
    (dict(batch_size=0), ValueError, "--batch_size must be >= 1"),
    (dict(batch_size=65), ValueError, "not divisible by --num_groups=2"),
    (dict(epochs=-3), ValueError, "--epochs must be >= 0, got -3"),
    (dict(steps=-1), ValueError, "--steps must be >= 0"),
    (dict(epochs=0, steps=0), ValueError, "Set --epochs >= 1 or --steps >= 1"),
    (dict(steps_per_execution=0), ValueError, "--steps_per_execution must be >= 1"),
    (dict(backup_keep=-1), ValueError, "--backup_keep must be >= 0"),
    (dict(backup_keep=1.5), TypeError, "--backup_keep must be an integer"),
    (dict(base_lr=0.0), ValueError, "--base_lr must be > 0"),
    (dict(weight_decay=-1e-4), ValueError, "--weight_decay must be >= 0"),
    (dict(alpha=-0.5), ValueError, "--alpha must be >= 0"),
    (dict(temperature=0.0), ValueError, "--temperature must be > 0"),
    (dict(mode="sync", temperature=-1.0), ValueError, "--temperature must be > 0"),
    (dict(warmup_epochs=-1.0), ValueError, "--warmup_epochs must be >= 0"),
    (dict(burn_in_steps=-1), ValueError, "--burn_in_steps must be >= 0, got -1"),
    (dict(alpha_ramp_steps=-1), ValueError, "--alpha_ramp_steps must be >= 0, got -1"),
    (dict(train_fraction=0.0), ValueError, "--train_fraction must be in (0, 1]"),
    (dict(train_fraction=1.5), ValueError, "--train_fraction must be in (0, 1]"),
    (dict(exchange_every=-1), ValueError, "--exchange_every must be >= 0"),
    (dict(peer_timeout=0.0), ValueError, "--peer_timeout must be > 0 seconds"),
    (dict(collective_timeout=-1.0), ValueError, "--collective_timeout must be > 0 seconds"),
    (dict(seed=-1), ValueError, "--seed must be in [0, 4294967], got -1"),
    (dict(seed=5_000_000), ValueError, "--seed must be in [0, "),
    (dict(verbose=4), ValueError, "--verbose must be 0, 1, 2 or 3 (0 silent, 1 progress bar, 2 one short"),
    (dict(verbose=-1), ValueError, "--verbose must be 0"),
    # unknown names (absl enums catch these on the command line; Python callers too)
    (dict(mode="all"), ValueError, "--mode must be sync, codistill or both"),
    (dict(data_mode="mixed"), ValueError, "--data_mode must be auto, shared or independent"),
    (
        dict(exchange="grpc"),
        ValueError,
        "--exchange must be predictions, weights, average, auto, local or horovod",
    ),
    (dict(on_stale="wait"), ValueError, "--on_stale must be keep or drop"),
    (dict(optimizer="sgdd"), ValueError, "--optimizer must be sgd, adam, adamw or lamb"),
    (dict(lr_schedule="cos"), ValueError, "--lr_schedule must be step, cosine or constant"),
    (dict(wd_schedule="linear"), ValueError, "--wd_schedule must be constant or paper"),
    (dict(distance="KL"), ValueError, "--distance must be mse, kl or reverse_kl; got 'KL'"),
    (dict(model="vgg"), ValueError, "Unknown model 'vgg'"),
    (dict(dataset=" "), ValueError, "--dataset is empty"),
    # milestones
    (dict(lr_milestones="0.9,0.2"), ValueError, "increasing fractions of the run in (0, 1)"),
    (dict(lr_milestones="0.2,0.2"), ValueError, "increasing fractions"),
    (dict(lr_milestones="nan"), ValueError, "increasing fractions"),
    (dict(lr_milestones="0.2,inf"), ValueError, "increasing fractions"),
    (dict(lr_milestones="late"), ValueError, "give goyal or delayed"),
    (dict(codistill_lr_milestones="1.5"), ValueError, "--codistill_lr_milestones='1.5'"),
    # contradictory combinations
    (dict(wd_schedule="paper", lr_schedule="cosine"), ValueError, "use --lr_schedule=step"),
    (dict(codistill_wd_schedule="paper", lr_schedule="constant"), ValueError, "use --lr_schedule=step"),
    (dict(lr_milestones="delayed", lr_schedule="cosine"), ValueError, "--lr_milestones only applies"),
    (
        dict(codistill_lr_milestones="delayed", lr_schedule="cosine"),
        ValueError,
        "only applies to --lr_schedule",
    ),
    (dict(mode="sync", codistill_wd_schedule="paper"), ValueError, "codistillation arm only"),
    (dict(mode="sync", codistill_lr_milestones="delayed"), ValueError, "codistillation arm only"),
    (dict(wd_schedule="paper", lr_milestones="0.5"), ValueError, "--lr_milestones='0.5' has one"),
    (
        dict(codistill_wd_schedule="paper", codistill_lr_milestones="0.5"),
        ValueError,
        "--codistill_lr_milestones='0.5' has one",
    ),
    (
        dict(exchange="horovod", mode="codistill", data_mode="independent"),
        ValueError,
        "needs --data_mode=shared",
    ),
    (dict(exchange="horovod", mode="both"), ValueError, "--mode=both runs both arms in one process"),
    (
        dict(exchange="horovod", mode="codistill", data_mode="shared", launched=False),
        ValueError,
        NOT_LAUNCHED,
    ),
    (dict(exchange="horovod", mode="both", launched=False), ValueError, NOT_LAUNCHED),
    (dict(exchange_dir="/tmp/x"), ValueError, "add --exchange=weights"),
    (dict(exchange="local", exchange_dir="/tmp/x"), ValueError, "add --exchange=weights"),
    (dict(exchange="weights", exchange_dir=""), ValueError, "--exchange_dir is empty"),
    (dict(group=1), ValueError, "--group only applies with --exchange=weights --exchange_dir"),
    (dict(exchange="weights", group=1), ValueError, "--group only applies with"),
    ({**WEIGHTS_DIR, "mode": "both"}, ValueError, "use --mode=codistill"),
    ({**WEIGHTS_DIR, "group": 2}, ValueError, "pass --group in [0, 2)"),
    ({**WEIGHTS_DIR, "group": -1}, ValueError, "pass --group in [0, 2)"),
    ({**WEIGHTS_DIR, "data_mode": "shared"}, ValueError, "every group draws its own data order"),
    (dict(exchange="average", data_mode="shared"), ValueError, "averaged islands reading the same batches"),
    (
        dict(exchange="average", exchange_every=0),
        ValueError,
        "--exchange=average needs --exchange_every >= 1",
    ),
    (dict(exchange="average", exchange_dir="/tmp/x"), ValueError, "add --exchange=weights"),
    (dict(exchange="average", steps_per_execution=4), ValueError, "a multiple of --steps_per_execution"),
    (dict(outer_lr=0.0), ValueError, "--outer_lr must be > 0"),
    (dict(outer_momentum=1.0), ValueError, "--outer_momentum must be in [0, 0.999]"),
]


def _launch_as(monkeypatch, overrides: dict) -> dict:
    """`overrides` less `launched`. --exchange=horovod configs are checked as a
    rank of a launched job (as horovodrun starts it) unless `launched=False`."""
    overrides = dict(overrides)
    launched = overrides.pop("launched", True)
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if overrides.get("exchange") == "horovod" and launched:
        monkeypatch.setenv("HOROVOD_RANK", "0")
    return overrides


@pytest.mark.parametrize(
    "overrides,error,message", BAD_CONFIGS, ids=[f"{i}-{m[:40]}" for i, (_, _, m) in enumerate(BAD_CONFIGS)]
)
def test_bad_train_config_is_rejected(overrides, error, message, monkeypatch):
    overrides = _launch_as(monkeypatch, overrides)
    config = dataclasses.replace(train.TrainConfig(), **overrides)
    with pytest.raises(error, match=re.escape(message)):
        config.validate()


GOOD_CONFIGS = [
    dict(),
    dict(mode="sync", num_groups=1, alpha=0.0),
    dict(mode="codistill", alpha=0.0, seed=4_294_967),
    dict(lr_schedule="cosine"),
    dict(lr_schedule="constant", warmup_epochs=0.0),
    dict(codistill_lr_milestones="delayed", codistill_wd_schedule="paper"),
    dict(wd_schedule="paper", lr_milestones="0.5,0.75"),
    dict(exchange="weights", data_mode="shared", mode="codistill"),
    dict(exchange="weights", exchange_every=0, mode="codistill", on_stale="drop", peer_timeout=0.5),
    dict(exchange="horovod", mode="codistill", data_mode="shared"),
    {**WEIGHTS_DIR, "group": 1},
    dict(epochs=0, steps=10, verbose=0),
]


@pytest.mark.parametrize("overrides", GOOD_CONFIGS, ids=[str(c) for c in GOOD_CONFIGS])
def test_good_train_config_passes(overrides, monkeypatch):
    overrides = _launch_as(monkeypatch, overrides)
    dataclasses.replace(train.TrainConfig(), **overrides).validate()


def test_burn_in_covering_the_run_is_rejected():
    config = train.TrainConfig(mode="codistill", batch_size=128, steps=0, epochs=2, burn_in_steps=62)
    with pytest.raises(ValueError, match=r"--burn_in_steps=62 covers the whole run \(62 steps\)"):
        config.check_run_length(num_train=4000)  # 31 steps per epoch
    config = dataclasses.replace(config, mode="sync")  # no distillation term: burn-in is moot
    config.check_run_length(num_train=4000)


def test_run_length_warnings():
    config = train.TrainConfig(steps=10, warmup_epochs=2.0, burn_in_steps=5, alpha_ramp_steps=10)
    warmup, ramp = config.check_run_length(num_train=4000)
    assert "--warmup_epochs=2 is 20 steps, not shorter than the run (10 steps)" in warmup
    assert "alpha never reaches 1" in ramp
    assert train.TrainConfig(steps=100, warmup_epochs=0.5).check_run_length(num_train=4000) == []


def test_directories(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--workdir=.* is an existing file, not a directory"):
        train.check_directory("workdir", str(a_file))
    with pytest.raises(ValueError, match="cannot be created: .*file is a file"):
        train.check_directory("workdir", str(a_file / "sub" / "dir"))
    with pytest.raises(ValueError, match="--workdir is empty"):
        train.check_directory("workdir", "")
    with pytest.raises(ValueError, match="--data_dir=.* is an existing file"):
        train.TrainConfig(data_dir=str(a_file)).validate()
    with pytest.raises(ValueError, match="--exchange_dir=.* is an existing file"):
        dataclasses.replace(train.TrainConfig(), **{**WEIGHTS_DIR, "exchange_dir": str(a_file)}).validate()
    train.check_directory("workdir", str(tmp_path / "new" / "run"))  # created later: fine
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a non-root user would see it
    with pytest.raises(ValueError, match="--workdir=.* is not writable"):
        train.check_directory("workdir", str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot be created: .* is not writable"):
        train.check_directory("workdir", str(tmp_path / "new"))
    train.check_directory("data_dir", str(tmp_path), must_write=False)  # prepared data may be read-only


# ------------------------------------------------------------------ public API
def _members(n=2):
    import keras

    return [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(n)]


def _spec():
    from tf_codistill.data import DatasetSpec

    return DatasetSpec("mnist1d", (40,), 10, 4000, 1000, "train", "test")


def _bad_api_calls(tmp_path):
    from models import build_model
    from tf_codistill import (
        AlphaSchedule,
        CodistillModel,
        DirectoryTransport,
        KLDivergence,
        LocalExchange,
        PiecewiseConstant,
        ReverseKLDivergence,
        StaleWeightsExchange,
        WarmupCosineDecay,
        WarmupPiecewiseDecay,
        data,
        get_distance,
        paper_weight_decay,
    )
    from tf_codistill.schedules import milestone_steps

    a_file = tmp_path / "file"
    a_file.write_text("x")
    return [
        # losses
        (lambda: KLDivergence(INF), ValueError, "temperature must be a finite number"),
        (lambda: ReverseKLDivergence(NAN), ValueError, "temperature must be a finite number"),
        (lambda: KLDivergence(0.0), ValueError, "temperature must be > 0"),
        (lambda: KLDivergence("2"), ValueError, "temperature must be a number"),
        (lambda: get_distance(["kl"]), ValueError, "Unknown distance ['kl']"),
        (lambda: get_distance("mse", temperature=NAN), ValueError, "temperature must be a finite number"),
        # schedules
        (lambda: AlphaSchedule(NAN), ValueError, "alpha must be a finite number"),
        (lambda: AlphaSchedule(INF), ValueError, "alpha must be a finite number"),
        (lambda: AlphaSchedule(-1.0), ValueError, "alpha must be >= 0"),
        (lambda: AlphaSchedule(1.0, burn_in_steps=2.5), TypeError, "burn_in_steps must be an integer"),
        (lambda: AlphaSchedule(1.0, ramp_steps=-1), ValueError, "burn_in_steps and ramp_steps must be >= 0"),
        (lambda: WarmupPiecewiseDecay(NAN, [10]), ValueError, "peak_lr must be a finite number"),
        (lambda: WarmupPiecewiseDecay(0.1, [10], decay_factor=0.0), ValueError, "decay_factor must be > 0"),
        (lambda: WarmupPiecewiseDecay(0.1, [20, 10]), ValueError, "boundaries must not decrease"),
        (lambda: WarmupPiecewiseDecay(0.1, [10], warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
        (
            lambda: WarmupPiecewiseDecay(0.1, [10], warmup_steps=1.5),
            TypeError,
            "warmup_steps must be an integer",
        ),
        (lambda: WarmupCosineDecay(INF, 100), ValueError, "peak_lr must be a finite number"),
        (lambda: WarmupCosineDecay(0.1, 0), ValueError, "total_steps must be >= 1"),
        (
            lambda: WarmupCosineDecay(0.1, 10, warmup_steps=10),
            ValueError,
            "need 0 <= warmup_steps < total_steps",
        ),
        (lambda: PiecewiseConstant([5], [1.0, NAN]), ValueError, "values[1] must be a finite number"),
        (lambda: PiecewiseConstant([-1], [1.0, 0.5]), ValueError, "boundaries[0] must be >= 0"),
        (lambda: PiecewiseConstant([5], [1.0]), ValueError, "need len(values) == len(boundaries) + 1"),
        (lambda: paper_weight_decay([10]), ValueError, "first two learning-rate decays"),
        (lambda: paper_weight_decay([10, 20], (1e-4, -1e-5, 0.0)), ValueError, "values must be >= 0"),
        (lambda: paper_weight_decay([10, 20], (1e-4, 0.0)), ValueError, "three weight decays"),
        (lambda: milestone_steps([0.5], 0), ValueError, "total_steps must be >= 1"),
        (lambda: milestone_steps([0.5, NAN], 10), ValueError, "fractions of the run in (0, 1)"),
        # CodistillModel
        (lambda: CodistillModel(_members(), alpha=NAN), ValueError, "alpha must be a finite number"),
        (lambda: CodistillModel(_members(), weight_decay=NAN), ValueError, "weight_decay must be a finite"),
        (lambda: CodistillModel(_members(), weight_decay="1e-4"), TypeError, "weight_decay must be a number"),
        (lambda: CodistillModel(_members(), num_classes=2.5), TypeError, "num_classes must be an integer"),
        (lambda: CodistillModel(_members(), exchange="local"), TypeError, "exchange must be a tf_codistill"),
        (lambda: CodistillModel(_members(), max_bad_peer_steps=1.5), TypeError, "max_bad_peer_steps must be"),
        (
            lambda: CodistillModel(_members(), max_bad_peer_steps=0),
            ValueError,
            "max_bad_peer_steps must be >= 1",
        ),
        (lambda: CodistillModel(_members(), data_mode="mixed"), ValueError, "data_mode must be one of"),
        (lambda: CodistillModel(_members(), distance="KL"), ValueError, "Unknown distance 'KL'"),
        (lambda: CodistillModel([]), ValueError, "at least one member"),
        # exchanges
        (lambda: StaleWeightsExchange(-1), ValueError, "exchange every must be >= 0"),
        (lambda: StaleWeightsExchange(2.5), TypeError, "every must be an integer"),
        (lambda: StaleWeightsExchange(10, peer_timeout=NAN), ValueError, "peer_timeout must be a finite"),
        (lambda: StaleWeightsExchange(10, peer_timeout=0), ValueError, "peer_timeout must be > 0 seconds"),
        (lambda: StaleWeightsExchange(10, on_stale="wait"), ValueError, "on_stale must be one of"),
        (lambda: StaleWeightsExchange(10, num_groups=0), ValueError, "num_groups must be >= 1"),
        (
            lambda: StaleWeightsExchange(10, transport=LocalExchange()),
            TypeError,
            "transport must be a Transport",
        ),
        (lambda: DirectoryTransport(""), ValueError, "path is empty"),
        (lambda: DirectoryTransport(None), TypeError, "path must be a directory path"),
        (lambda: DirectoryTransport(str(tmp_path / "x"), keep=0), ValueError, "keep must be >= 1"),
        (
            lambda: DirectoryTransport(str(tmp_path / "x"), poll_seconds=NAN),
            ValueError,
            "poll_seconds must be",
        ),
        (lambda: DirectoryTransport(str(a_file)), ValueError, "is not writable"),
        # data
        (lambda: data.load_spec(""), ValueError, "The dataset name is empty"),
        (lambda: data.load_spec(3), TypeError, "name must be a dataset name"),
        (lambda: data.load_spec("mnist1d/nabc"), ValueError, "mnist1d/n<samples>"),
        (
            lambda: data.load_spec("mnist1d", train_fraction=NAN),
            ValueError,
            "train_fraction must be in (0, 1]",
        ),
        (lambda: data.load_spec("mnist1d", train_fraction="1"), TypeError, "train_fraction must be a number"),
        (lambda: data.load_spec("mnist1d", str(a_file)), ValueError, "is an existing file, not a directory"),
        (lambda: data.train_batches(_spec(), 0, seed=0), ValueError, "batch_size must be >= 1"),
        (lambda: data.train_batches(_spec(), 32.0, seed=0), TypeError, "batch_size must be an integer"),
        (
            lambda: data.eval_batches(_spec(), 32, shard=(2, 2)),
            ValueError,
            "shard must be (index, count)",
        ),
        (lambda: data.eval_batches(_spec(), 0), ValueError, "batch_size must be >= 1"),
        (lambda: data.eval_batches(_spec(), 10, limit=-1), ValueError, "limit must be an integer >= 0"),
        # models
        (lambda: build_model("vgg", (40,), 10), ValueError, "Unknown model 'vgg'"),
        (lambda: build_model("mlp", (40,), 1), ValueError, "num_classes must be >= 2"),
        (lambda: build_model("mlp", (40,), 10.0), TypeError, "num_classes must be an integer"),
        (lambda: build_model("mlp", (0,), 10), ValueError, "input_shape must be a non-empty tuple"),
        (lambda: build_model("mlp", 40, 10), TypeError, "input_shape must be a tuple"),
        (lambda: build_model("mlp", (40,), 10, seed=-1), ValueError, "seed must be an integer in [0, 2**32)"),
    ]


def test_bad_public_api_arguments_are_rejected(tmp_path):
    failures = []
    for call, error, message in _bad_api_calls(tmp_path):
        try:
            call()
        except error as err:
            if message not in str(err):
                failures.append(f"{message!r} not in {str(err)!r}")
        except Exception as err:  # noqa: BLE001 - collected and reported below
            failures.append(f"{message!r}: expected {error.__name__}, got {type(err).__name__}: {err}")
        else:
            failures.append(f"{message!r}: no error")
    assert not failures, "\n".join(failures)


def test_codistill_loop_arguments(tmp_path):
    import keras

    from tf_codistill import CodistillLoop, CodistillModel

    model = CodistillModel(_members(), alpha=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(TypeError, match="max_checkpoints must be an integer"):
        CodistillLoop(model, max_checkpoints=2.0)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        CodistillLoop(model, checkpoint_every=-1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir=.* is an existing file"):
        CodistillLoop(model, checkpoint_dir=str(a_file))
    loop = CodistillLoop(model)
    with pytest.raises(TypeError, match="steps must be an integer"):
        loop.train(None, steps=10.5)
    with pytest.raises(ValueError, match="steps and log_every must be >= 0"):
        loop.train(None, steps=10, log_every=-1)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        loop.evaluate(None, steps=-1)


# ----------------------------------------------------------- launch and study
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--np=2", "--timeout=nan", "--", "train.py"], "--timeout must be a finite number of seconds"),
        (["--np=2", "--collective_timeout=inf", "--", "train.py"], "--collective_timeout must be a finite"),
        (
            ["--np=2", "--groups=2", "--", "train.py", "--collective_timeout=nan"],
            "the program's --collective_timeout",
        ),
        (["--np=0", "--", "train.py"], "--np must be >= 1"),
        (["--np=3", "--groups=2", "--", "train.py"], "does not divide --np=3"),
    ],
)
def test_launch_rejects_bad_arguments(argv, message, capsys, monkeypatch):
    from tf_codistill import launch

    monkeypatch.chdir(REPO)
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch: error: ") and message in err, err


STUDY = 'name = "s"\nseeds = [0]\n[common]\nsteps = 10\n[[arms]]\nlabel = "a"\nmode = "sync"\n'


@pytest.mark.parametrize(
    "text,message",
    [
        (STUDY.replace("steps = 10", "stesp = 10"), "[common] has `stesp`, which is not a train.py flag"),
        (STUDY.replace("steps = 10", "seed = 3"), "sets `seed`, which the study runner sets"),
        (STUDY + 'workdir = "x"\n', "arm 'a' sets `workdir`"),
        (STUDY + "alpha = nan\n", "arm 'a': --alpha must be a finite number, got nan"),
        (STUDY.replace("steps = 10", 'steps = "10"'), "[common]: --steps must be an integer, got '10'"),
        (STUDY.replace("steps = 10", "steps = -10"), "[common]: --steps must be >= 0, got -10"),
        (STUDY + 'optimizer = "sgdd"\n', "--optimizer must be sgd, adam, adamw or lamb; got 'sgdd'"),
        (STUDY + 'lr_milestones = "0.5,0.2"\n', "--lr_milestones='0.5,0.2': give goyal or delayed"),
        (
            STUDY.replace("seeds = [0]", "seeds = [true]"),
            "`seeds` must be a non-empty list of distinct integers",
        ),
        (STUDY.replace("seeds = [0]", "seeds = [1, 1]"), "distinct integers >= 0"),
        (STUDY.replace('name = "s"', 'name = "../s"'), "`name` must be a folder name"),
        (STUDY.replace('label = "a"', 'label = "a/b"'), "arm labels must be folder names"),
        ('name = "s"\nseeds = [0]\narms = ["sync"]\n', "`arms` must be a non-empty array of tables"),
        ('name = "s"\nseeds = [0]\ncommon = 3\n[[arms]]\nlabel = "a"\n', "`common` must be a table"),
    ],
)
def test_study_file_errors(text, message, tmp_path):
    from tf_codistill import study

    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        study.load_study(str(path))


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--parallel=0", "--parallel must be >= 1"),
        ("--timeout=nan", "--timeout must be a finite number > 0"),
        ("--seeds=a,b", "give integers separated by commas"),
        ("--set=steps", "give key=value"),
        ("--set=stesp=5", "`stesp` is not a train.py flag"),
        ("--set=alpha=abc", "--set='alpha=abc': --alpha must be a number, got 'abc'"),
        ("--set=num_groups=0", "--num_groups must be >= 1, got 0"),
    ],
)
def test_study_command_line_errors(flag, message, tmp_path, capsys):
    from tf_codistill import study

    path = tmp_path / "s.toml"
    path.write_text(STUDY)
    assert study.main([f"--config={path}", f"--out={tmp_path / 'out'}", flag]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------- the command line
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--alpha=nan"], "--alpha must be a finite number, got nan"),
        (["--exchange_dir=/tmp/x"], "--exchange_dir is for the stale-weights exchange"),
        (["--workdir={file}"], "is an existing file, not a directory"),
    ],
)
def test_command_line_error_is_one_line_and_exit_2(flags, message, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    flags = [f.format(file=a_file) for f in flags]
    if not any(f.startswith("--workdir") for f in flags):
        flags.append(f"--workdir={tmp_path / 'run'}")
    proc = subprocess.run(
        [sys.executable, "train.py", *flags],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()
