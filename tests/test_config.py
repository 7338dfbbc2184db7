"""Settings declared once (tf_codistill/config.py): the dataclass, the absl
flags, the per-setting checks and the study file check agree."""

import dataclasses
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
