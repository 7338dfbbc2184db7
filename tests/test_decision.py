"""The scale-out decision section (tf_codistill/study/decision.py) on
hand-made CSV rows: verdicts from the Welch interval of updates to the
target, seeds that never reach it or diverge counted apart, and the wall
time over links of several rates."""

import math

import pytest

from tf_codistill import stats
from tf_codistill.study import decision, load_study
from tf_codistill.study.analysis import StudyData
from tf_codistill.study.spec import effective

STUDY = """\
# python -m tf_codistill.study --config=this.toml
name = "decide"
seeds = [10, 11, 12]
target_accuracy = 0.9
select = "val_updates_to_target"
[common]
dataset = "mnist1d_fresh"
model = "cnn1d_norm"
steps = 400
steps_per_epoch = 25
[[arms]]
label = "sync_b64"
mode = "sync"
batch_size = 64
[[arms]]
label = "sync_b128"
mode = "sync"
batch_size = 128
[[arms]]
label = "codistill_2x64"
mode = "codistill"
num_groups = 2
batch_size = 128
[[arms]]
label = "codistill0_2x64"
mode = "codistill"
num_groups = 2
batch_size = 128
alpha = 0.0
[[decision]]
b = 64
sync = "sync_b64"
sync_2b = "sync_b128"
codistill = "codistill_2x64"
alpha0 = "codistill0_2x64"
{walltime}
"""

WALLTIME = """\
[walltime]
source = "a test"
efficiency = 0.5
latency_seconds = 0.001
rates_gbit = [1, 100]
per_worker_batch = 32
[[walltime.models]]
name = "tiny"
params = 1000000
classes = 10
sync_seconds = 0.01
codistill_seconds = 0.012
"""

# Updates to 0.9 per seed (None: never within the run).
REACH = {
    "sync_b64": [300, 325, 350],
    "sync_b128": [200, 225, 250],
    "codistill_2x64": [100, 125, 150],
    "codistill0_2x64": [300, None, 350],
}


def _data(tmp_path, reach=REACH, walltime=WALLTIME, diverged=()):
    path = tmp_path / "decide.toml"
    path.write_text(STUDY.format(walltime=walltime))
    study = load_study(str(path))
    runs, curves = [], []
    for arm, targets in reach.items():
        for seed, at in zip(study["seeds"], targets):
            status = "diverged" if (arm, seed) in diverged else "ok"
            runs.append({"arm": arm, "seed": seed, "status": status, "bytes_equivalent_per_step": 1234.0})
            for k in range(16):
                updates = 25 * (k + 1)
                val = 0.95 if at is not None and updates >= at else 0.5
                ens = 0.95 if updates >= 200 else 0.5
                curves.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "epoch": k + 1,
                        "updates": updates,
                        "val_accuracy": val,
                        "val_ensemble_accuracy": ens if arm.startswith("codistill") else None,
                    }
                )
    return study, StudyData(study, runs, curves)


def _lines(study, data):
    return decision.report_lines(data, lambda label, key: effective(study, data.by_label[label], key))


def test_fewer_updates_with_an_added_group_says_add_a_group(tmp_path):
    study, data = _data(tmp_path)
    text = "\n".join(_lines(study, data))
    row = next(line for line in text.splitlines() if line.startswith("| 64 |"))
    expected = stats.welch([100, 125, 150], [200, 225, 250])
    assert f"{expected.diff:+,.0f} [{expected.low:+,.0f}, {expected.high:+,.0f}]" in row
    assert "**add a group**" in row
    assert "325 ± 25 (2/3 reached)" in row  # alpha 0: one seed never reached 90%
    assert "200 ± 0 (3/3 reached)" in row  # the alpha-0 pair's ensemble
    assert "2 confirmatory intervals" in text


def test_the_other_way_round_and_an_unresolved_interval(tmp_path):
    slower = {**REACH, "codistill_2x64": [300, 325, 350]}
    study, data = _data(tmp_path, slower)
    assert "**double the batch**" in "\n".join(_lines(study, data))
    level = {**REACH, "codistill_2x64": [150, 250, 275]}
    study, data = _data(tmp_path, level)
    assert "**cannot be told apart**" in "\n".join(_lines(study, data))


def test_diverged_seeds_are_counted_apart(tmp_path):
    study, data = _data(tmp_path, diverged={("codistill_2x64", 11), ("codistill_2x64", 12)})
    row = next(line for line in _lines(study, data) if line.startswith("| 64 |"))
    assert "100 ± 0 (1/1 reached, 2 diverged)" in row
    assert "not measured" in row  # one surviving seed: no interval


def test_wall_time_is_updates_times_the_step_over_each_link(tmp_path):
    study, data = _data(tmp_path)
    wall = study["walltime"]
    lines = _lines(study, data)
    # sync at 128: 4 workers of 32 in one ring; at 1 Gbit/s
    ring = 2 * 3 / 4 * 1_000_000 * 4
    step = 0.01 + 2 * 3 * 0.001 + ring * 8 / (0.5 * 1e9)
    assert math.isclose(decision.step_seconds("sync", 1, 128, 1_000_000, 10, 0.01, 1, wall), step)
    row = next(line for line in lines if line.startswith("| 64 | sync_b128 | 4 |"))
    assert f"{225 * step:,.1f}" in row
    # codistillation: a ring of 2 in each group, plus the logits of 32 examples to the other group
    got = decision.step_seconds("codistill", 2, 128, 1_000_000, 10, 0.012, 100, wall)
    sent = 2 * 1 / 2 * 1_000_000 * 4 + 32 * 10 * 4
    assert math.isclose(got, 0.012 + 3 * 0.001 + sent * 8 / (0.5 * 100e9))


def test_a_decision_naming_an_unknown_arm_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.format(walltime="").replace('alpha0 = "codistill0_2x64"', 'alpha0 = "nope"'))
    with pytest.raises(ValueError, match=r"alpha0 = 'nope' is not an arm"):
        load_study(str(path))
    path.write_text(STUDY.format(walltime=WALLTIME.replace("per_worker_batch = 32\n", "")))
    with pytest.raises(ValueError, match=r"\[walltime\] unknown keys \[\], missing \['per_worker_batch'\]"):
        load_study(str(path))
    path.write_text(STUDY.format(walltime=WALLTIME.replace("classes = 10\n", "")))
    with pytest.raises(ValueError, match=r"walltime.models\]\] takes exactly"):
        load_study(str(path))
