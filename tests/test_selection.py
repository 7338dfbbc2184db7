"""Grid points chosen on validation, never on test; edge flags; updates to a
target on a recorded curve; the critical-batch fit."""

import math
import types

import pytest

from tf_codistill import selection, study
from tf_codistill.study import spec as study_spec

STUDY = """\
# python -m tf_codistill.study --config=this.toml
name = "pick"
seeds = [0, 1]
target_accuracy = 0.9
select = "{select}"
[common]
dataset = "mnist1d_fresh"
model = "cnn1d_norm"
mode = "sync"
steps = 100
steps_per_epoch = 25
[[arms]]
label = "sync_b64"
batch_size = 64
[arms.grid]
lr = [0.1, 0.2, 0.4]
"""

# Validation curves (every 25 updates) per grid point, and final test
# accuracies that favour the point validation does not.
CURVES = {
    "sync_b64-lr0.1": [0.5, 0.8, 0.88, 0.91],  # reaches 0.9 at 100
    "sync_b64-lr0.2": [0.6, 0.85, 0.92, 0.93],  # reaches at 75; best final validation
    "sync_b64-lr0.4": [0.7, 0.91, 0.90, 0.92],  # reaches at 50: fewest updates
}
TEST = {"sync_b64-lr0.1": 0.99, "sync_b64-lr0.2": 0.90, "sync_b64-lr0.4": 0.91}


def _study(tmp_path, select):
    path = tmp_path / f"{select}.toml"
    path.write_text(STUDY.format(select=select))
    spec = study.load_study(str(path))
    runs, curves = [], []
    for label, curve in CURVES.items():
        for seed in spec["seeds"]:
            runs.append(
                {"study": "pick", "arm": label, "seed": seed, "status": "ok", "mode": "sync", "num_groups": 1,
                 "batch_size_per_group": 64, "steps": 100, "epochs": 4, "steps_per_epoch": 25,
                 "test_accuracy": TEST[label], "test_loss": 0.3, "train_loss": 0.3,
                 "bytes_equivalent_per_step": 1.0, "wall_seconds": 1.0, "process_seconds": 2.0}
            )  # fmt: skip
            for i, value in enumerate(curve):
                curves.append(
                    {"study": "pick", "arm": label, "seed": seed, "epoch": i + 1, "updates": 25 * (i + 1),
                     "val_accuracy": value, "task_loss": 1.0 - value}
                )  # fmt: skip
    out = tmp_path / select
    study.write_csvs(str(out), runs, curves, spec)
    study.build_report(spec, str(out), str(path), plots=False)
    return spec, (out / "REPORT.md").read_text()


def test_updates_to_target_is_the_first_evaluation_at_or_above_it():
    curve = [0.5, float("nan"), 0.899, 0.9, 0.85, 0.95]
    updates = [25, 50, 75, 100, 125, 130]
    assert selection.updates_to_target(curve, updates, 0.9) == 100
    assert selection.updates_to_target(curve, updates, 0.95) == 130
    assert selection.updates_to_target(curve, updates, 0.96) is None
    with pytest.raises(ValueError, match="6 accuracies but 2"):
        selection.updates_to_target(curve, updates[:2], 0.9)


def test_results_json_records_updates_to_target_on_the_recorded_curve():
    from tf_codistill.runner import target_results

    history = {"val_accuracy": [0.5, 0.91, 0.89, 0.93], "val_ensemble_accuracy": [0.6, 0.8, 0.95, 0.97]}
    plan = types.SimpleNamespace(steps_per_epoch=25, total_steps=90)  # the last evaluation at 90, not 100
    got = target_results(history, plan, 0.92)
    assert got == {
        "target_accuracy": 0.92,
        "updates_to_target": 90,
        "ensemble_updates_to_target": 75,
        "final_val_accuracy": 0.93,
    }


@pytest.mark.parametrize(
    "select,chosen", [("val_accuracy", "sync_b64-lr0.2"), ("val_updates_to_target", "sync_b64-lr0.4")]
)
def test_grid_points_are_chosen_on_validation_and_an_edge_is_flagged(tmp_path, select, chosen):
    spec, report = _study(tmp_path, select)
    line = next(line for line in report.splitlines() if line.startswith(f"| sync_b64 | `--lr={chosen[-3:]}`"))
    assert line.endswith("| yes |")  # test accuracy would have chosen lr 0.1 (99%)
    assert "Grid points are chosen on the validation split" in report
    if chosen.endswith("0.4"):
        assert "EDGE: `sync_b64` chose --lr=0.4, the largest of its grid (0.1, 0.2, 0.4)" in report
        assert "run --lr=0.8 next" in report
    else:
        assert "Every chosen grid point is interior" in report and "EDGE" not in report


def test_a_study_with_a_validation_split_cannot_choose_on_test(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.format(select="test_accuracy"))
    with pytest.raises(ValueError, match="choose grid points on it"):
        study.load_study(str(path))
    path.write_text(STUDY.format(select="val_accuracy").replace("mnist1d_fresh", "mnist1d/n70000"))
    with pytest.raises(ValueError, match="needs a validation split"):
        study.load_study(str(path))
    # a TFDS dataset with a validation split held out of its training split
    held_out = STUDY.format(select="val_accuracy").replace(
        '"mnist1d_fresh"', '"mnist1d/n70000"\nvalidation_fraction = 0.1'
    )
    path.write_text(held_out)
    assert study.load_study(str(path))["select"] == "val_accuracy"
    assert selection.curve_split(study.load_study(str(path))) == "validation"
    path.write_text(STUDY.replace('select = "{select}"\n', ""))
    assert study.load_study(str(path))["select"] == "val_accuracy"  # the default where validation exists


def test_the_critical_batch_fit_and_knee():
    points = [(b, 1000 * (1 + 512 / b)) for b in (64, 128, 256, 512, 1024, 2048)]
    s_min, b_noise = selection.fit_critical_batch(points)
    assert math.isclose(s_min, 1000) and math.isclose(b_noise, 512)
    # S(b)/S(2b) = (b + 512) / (b + 256): below 1.5 from b = 512 on
    assert selection.knee(points) == 512
    assert selection.knee([(64, 400), (128, 200)]) is None
    assert selection.fit_critical_batch([(64, 100)]) is None


def test_the_scale_out_study_files_are_valid_train_configs():
    """Every arm of the scale-out stages (grid points included) passes train.py's checks."""
    import os

    from tf_codistill import config, fresh_data

    root = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "scale_out"
    )
    paths = [os.path.join(root, name) for name in sorted(os.listdir(root)) if name.endswith(".toml")]
    assert [os.path.basename(p) for p in paths] == [
        "stage1_critical_batch.toml",
        "stage2a_tune.toml",
        "stage2b_decision.toml",
    ]  # make study-scale-out runs them in this order
    for path in paths:
        spec = study.load_study(path)
        assert open(path).readline().startswith("# python -m tf_codistill.study")
        assert len(spec["seeds"]) >= 3 and spec["select"] in selection.SELECT
        for arm in spec["arms"]:
            train = config.TrainConfig(**{**spec["common"], **study_spec.train_settings(arm)})
            train.validate()
            assert train.check_run_length(fresh_data.STREAM_SIZE) == []
            assert train.steps_per_epoch <= 25  # validation at least every 25 updates
    assert not set(study.load_study(paths[1])["seeds"]) & set(study.load_study(paths[2])["seeds"])
