import numpy as np
import pytest

from tf_codistill import schedules


def _values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_alpha_burn_in_and_ramp():
    s = schedules.AlphaSchedule(2.0, burn_in_steps=10, ramp_steps=4)
    got = _values(s, [0, 9, 10, 11, 12, 13, 14, 100])
    np.testing.assert_allclose(got, [0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(_values(schedules.AlphaSchedule(0.3), [0, 5]), [0.3, 0.3], rtol=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, "1"])
def test_alpha_rejects_bad_values(alpha):
    with pytest.raises(ValueError, match="alpha must be"):
        schedules.AlphaSchedule(alpha)


def test_warmup_step_decay():
    s = schedules.WarmupPiecewiseDecay(1.0, [10, 20], 0.1, warmup_steps=4)
    got = _values(s, [0, 1, 3, 9, 10, 19, 20, 50])
    np.testing.assert_allclose(got, [0.25, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_warmup_cosine():
    s = schedules.WarmupCosineDecay(1.0, total_steps=12, warmup_steps=2)
    got = _values(s, [0, 1, 2, 7, 12])
    np.testing.assert_allclose(got, [0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_goyal_scaling_and_milestones():
    assert schedules.goyal_learning_rate(0.1, 512) == pytest.approx(0.2)
    assert schedules.milestone_steps(schedules.MILESTONE_PRESETS["goyal"], 900) == [300, 600, 800]
    assert schedules.milestone_steps(schedules.MILESTONE_PRESETS["delayed"], 450) == [180, 380, 440]
    with pytest.raises(ValueError, match="fractions of the run"):
        schedules.milestone_steps([0.5, 1.5], 100)


def test_paper_weight_decay_follows_lr_decays():
    wd = schedules.paper_weight_decay([30, 60, 80])
    np.testing.assert_allclose(
        _values(wd, [0, 29, 30, 59, 60, 100]), [1e-4, 1e-4, 1e-5, 1e-5, 0, 0], rtol=1e-6
    )
    with pytest.raises(ValueError, match="first two learning-rate decays"):
        schedules.paper_weight_decay([30])
