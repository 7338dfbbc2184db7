"""Settings declared once (tf_codistill/config.py): the dataclass, the absl
flags, the per-setting checks and the study file check agree."""

import dataclasses
import re
import subprocess
import sys

import pytest
from absl import flags
from conftest import REPO, python_env

from tf_codistill import config
from tf_codistill.config import SETTINGS, TrainConfig


def test_flags_are_the_settings():
    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    assert set(flag_values) == set(SETTINGS) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, spec in SETTINGS.items():
        flag = flag_values[name]
        assert flag.default == spec.default == getattr(TrainConfig(), name), name
        assert flag.help.endswith(spec.help) and spec.help, name
        if spec.kind == "str" and spec.choices:
            assert list(flag.parser.enum_values) == list(spec.choices), name


def test_flag_values_make_a_valid_default_config(monkeypatch):
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    flag_values(["train.py", "--alpha=0.5", "--mode=codistill", "--codistill_wd_schedule=paper"])
    made = TrainConfig(**{name: flag_values[name].value for name in SETTINGS})
    assert made == TrainConfig(alpha=0.5, mode="codistill", codistill_wd_schedule="paper")
    made.validate()


def test_choices_match_the_registries():
    from tf_codistill.losses import DISTANCES
    from tf_codistill.schedules import MILESTONE_PRESETS

    assert set(SETTINGS["distance"].choices) == set(DISTANCES)
    assert config.MILESTONE_NAMES == tuple(MILESTONE_PRESETS)
    assert all(len(v) >= 2 for v in MILESTONE_PRESETS.values())  # --wd_schedule=paper needs two


def test_auto_decisions_are_taken_once_per_validate(monkeypatch):
    from tf_codistill import topology

    calls = []
    monkeypatch.setattr(topology, "multi_process_launch", lambda: calls.append(1) or False)
    TrainConfig().validate()
    assert len(calls) == 1
    config_ = TrainConfig(exchange="weights", exchange_dir="/tmp/tf_codistill-x", mode="codistill", group=0)
    calls.clear()
    config_.validate()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "settings,expected",
    [
        (dict(steps=45), (31, 45, 2)),  # exactly 45 updates: an epoch of 31, then one of 14
        (dict(steps=62), (31, 62, 2)),
        (dict(steps=10), (10, 10, 1)),  # shorter than an epoch: the run is the epoch
        (dict(steps=0, epochs=3), (31, 93, 3)),
    ],
)
def test_run_length(settings, expected):
    assert TrainConfig(batch_size=128, **settings).run_length(num_train=4000) == expected


def test_check_setting_and_parse_setting():
    config.check_setting("codistill_wd_schedule", None)  # optional
    with pytest.raises(ValueError, match=r"--train_fraction must be in \(0, 1\], got 1.5"):
        config.check_setting("train_fraction", 1.5)
    with pytest.raises(TypeError, match="--seed must be an integer, got 1.5"):
        config.check_setting("seed", 1.5)
    with pytest.raises(KeyError):
        config.check_setting("stesp", 3)
    assert config.parse_setting("steps", "45") == 45 and config.parse_setting("alpha", "0.5") == 0.5
    with pytest.raises(ValueError, match="--steps must be an integer, got '4.5'"):
        config.parse_setting("steps", "4.5")


def test_study_checks_settings_without_tensorflow(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "s"\nseeds = [0]\n[common]\nsteps = 10\nalpha = 0.5\ndistance = "mse"\n'
        '[[arms]]\nlabel = "a"\nmode = "sync"\n'
    )
    code = (
        "import sys\nfrom tf_codistill import study\n"
        f"study.load_study({str(path)!r})\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "settings,kind,transport,note",
    [
        (dict(), "predictions", "local", None),
        (
            dict(exchange="local"),
            "predictions",
            "local",
            "--exchange=local is deprecated; it means --exchange=predictions --transport=local.",
        ),
        (
            dict(exchange="auto"),
            "predictions",
            "local",
            "--exchange=auto is deprecated; it means --exchange=predictions.",
        ),
        (dict(exchange="weights"), "weights", "local", None),
        (dict(exchange="average", transport="local"), "average", "local", None),
        (
            dict(exchange="weights", exchange_dir="/tmp/tf_codistill-x", mode="codistill", group=0),
            "weights",
            "directory",
            None,
        ),
    ],
)
def test_exchange_kind_and_transport_and_the_older_spellings(settings, kind, transport, note):
    config_ = TrainConfig(**settings)
    config_.validate()
    assert (config_.resolved_kind(), config_.resolved_transport()) == (kind, transport)
    assert config_.deprecations() == ([note] if note else [])


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(exchange="horovod"), "--transport=horovod runs one process per worker"),
        (dict(transport="horovod"), "--transport=horovod runs one process per worker"),
        (dict(exchange="local", transport="horovod"), "write --exchange=predictions --transport=horovod"),
        (dict(exchange="weights", transport="directory", mode="codistill", group=0), "add --exchange_dir"),
        (
            dict(exchange="weights", transport="local", exchange_dir="/tmp/x", mode="codistill", group=0),
            "drop --transport=local",
        ),
    ],
)
def test_transport_mistakes_are_named(settings, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        TrainConfig(**settings).validate()


def test_each_choice_list_is_the_one_in_choices():
    from tf_codistill import choices, losses, model, runtime
    from tf_codistill.exchange import weights

    assert tuple(losses.DISTANCES) == choices.DISTANCES == SETTINGS["distance"].choices
    assert model.DATA_MODES is choices.DATA_MODES
    assert weights.ON_STALE is choices.ON_STALE is SETTINGS["on_stale"].choices
    assert runtime.PRECISIONS is choices.PRECISIONS is SETTINGS["precision"].choices
    assert SETTINGS["collective_implementation"].choices is choices.COLLECTIVE_IMPLEMENTATIONS
    assert set(runtime.EXCHANGES) < set(SETTINGS["exchange"].choices)
    assert SETTINGS["transport"].choices == ("auto", *choices.TRANSPORTS)
