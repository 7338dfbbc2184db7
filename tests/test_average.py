"""Parameter averaging (local SGD, DiLoCo): its invariants in one process,
a 2-process Horovod job, and resuming a killed run."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, horovodrun, python_env, worker_env
from test_model import INPUT, _batch, _clone, _members, _weights
from test_resume import CODISTILL, STEPS, _kill_and_resume

from tf_codistill import CodistillModel
from tf_codistill.exchange.average import AveragingExchange, outer_sgd

SIZE = 16


def _island_batches(steps, islands, size=SIZE):
    """Island g's batch at step k is `_batch(100 * g + k)`: its own data order."""
    return [[_batch(100 * g + k, size) for g in range(islands)] for k in range(steps)]


def _dataset(batches):
    islands = len(batches[0])
    xs = tuple(np.stack([b[g][0] for b in batches]) for g in range(islands))
    ys = tuple(np.stack([b[g][1] for b in batches]) for g in range(islands))
    return tf.data.Dataset.from_tensor_slices((xs, ys))


def _model(islands, every, inner, outer=None, alpha=None, seed=0, teacher="shared"):
    exchange = AveragingExchange(every, outer, teacher=teacher)
    model = CodistillModel(
        _members(islands, seed=seed), alpha=alpha, data_mode="independent", exchange=exchange
    )
    model.compile(optimizer=inner)
    return model


def _same(a, b, atol=0.0):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_islands_hold_identical_weights_right_after_each_outer_step():
    every, steps, islands = 3, 10, 3
    model = _model(islands, every, keras.optimizers.SGD(0.2, momentum=0.9))
    seen = []

    def check(batch, logs=None):
        step = int(model.optimizer.iterations.numpy())
        weights = [_weights(m) for m in model.members]
        equal = all(np.array_equal(x, y) for w in weights[1:] for x, y in zip(weights[0], w))
        seen.append((step, equal))

    model.fit(
        _dataset(_island_batches(steps, islands)),
        epochs=1,
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=check)],
    )
    # Identical at the start and right after every outer step (steps 3, 6, 9);
    # apart in between, since each island reads its own batches.
    assert seen == [(s, s % every == 0) for s in range(steps)]
    assert model.exchange.outer_steps == 3
    assert model.alpha_schedule.alpha == 0.0  # pure DiLoCo unless alpha is given
    # A ring all-reduce of 1,000 float32 parameters over 3 islands every 3 steps.
    assert model.exchange.bytes_sent_per_step(SIZE, 5, 1000) == pytest.approx(2 * 2 / 3 * 1000 * 4 / 3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_averaging_every_step_is_synchronous_sgd_on_the_union_of_batches(momentum):
    """H = 1, outer SGD with learning rate 1 and no momentum: the islands'
    mean after one inner step each is one step on the union of their batches
    (with inner momentum too: the mean of the velocities is the velocity of
    the mean gradient)."""
    steps, islands = 6, 3
    model = _model(islands, 1, keras.optimizers.SGD(0.3, momentum=momentum), outer_sgd(1.0, 0.0))
    sync = _clone(model.members[0])  # the islands all start from member 0's weights
    batches = _island_batches(steps, islands)
    model.fit(_dataset(batches), epochs=1, verbose=0)

    sync.compile(
        optimizer=keras.optimizers.SGD(0.3, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for step in batches:
        x = np.concatenate([b[0] for b in step])
        y = np.concatenate([b[1] for b in step])
        sync.train_on_batch(x, y)
    for member in model.members:
        _same(_weights(member), _weights(sync), atol=2e-6)


def _first_outer_step(lr, momentum, islands=2, every=4):
    """(weights at the start, the islands' mean before the first outer
    step, island 0's weights after it)."""
    model = _model(islands, every, keras.optimizers.SGD(0.2), outer_sgd(lr, momentum))
    seen = {}

    def record(batch, logs=None):
        seen.setdefault("start", _weights(model.members[0]))
        if int(model.optimizer.iterations.numpy()) == every and "mean" not in seen:
            seen["mean"] = [np.mean(ws, axis=0) for ws in zip(*(_weights(m) for m in model.members))]

    # Runs before the exchange's callback: sees the islands before the outer step.
    hook = keras.callbacks.LambdaCallback(on_train_batch_begin=record, on_train_batch_end=record)
    model.fit(_dataset(_island_batches(every, islands)), epochs=1, verbose=0, callbacks=[hook])
    return seen["start"], seen["mean"], _weights(model.members[0])


@pytest.mark.parametrize("lr, momentum", [(1.0, 0.0), (0.7, 0.9)])
def test_plain_averaging_takes_the_islands_mean_and_nesterov_overshoots_it(lr, momentum):
    start, mean, after = _first_outer_step(lr, momentum)
    # Keras's Nesterov SGD from zero velocity: w - lr * (1 + momentum) * g,
    # with g the mean delta start - mean (lr 1, no momentum: the mean itself).
    expected = [s - lr * (1 + momentum) * (s - m) for s, m in zip(start, mean)]
    _same(after, expected, atol=2e-6)


def test_islands_that_also_codistil_learn_from_the_shared_weights():
    """alpha > 0: the teacher is the model every island held at the last
    outer step, so right after one the distillation term is 0."""
    every, islands = 3, 2
    model = _model(islands, every, keras.optimizers.SGD(0.2), alpha=0.5)
    distill = []
    for step, batch in enumerate(_island_batches(9, islands)):
        xs, ys = tuple(b[0] for b in batch), tuple(b[1] for b in batch)
        logs = model.train_on_batch(xs, ys, return_dict=True)
        distill.append((step, float(logs["distill_loss"])))
    model.finish_batch_training()
    for step, value in distill:
        if step % every == 0:
            assert value == pytest.approx(0.0, abs=1e-6), distill
        else:
            assert value > 1e-6, distill


def test_custom_loop_averages_like_fit_and_resumes_from_its_checkpoint(tmp_path):
    """CodistillLoop runs the outer step as fit does; stopped mid-round
    (step 4 of H = 3) and resumed by a new loop and model, it ends where one
    uninterrupted loop ends: the shared weights and outer momentum came back."""
    from tf_codistill.loop import CodistillLoop

    batches = _island_batches(7, 2)
    models = [_model(2, 3, keras.optimizers.SGD(0.2, momentum=0.9)) for _ in range(4)]
    models[0].fit(_dataset(batches), epochs=1, verbose=0)
    CodistillLoop(models[1]).train(_dataset(batches), steps=7)
    CodistillLoop(models[2], checkpoint_dir=str(tmp_path)).train(_dataset(batches), steps=4)
    CodistillLoop(models[3], checkpoint_dir=str(tmp_path)).train(_dataset(batches).skip(4), steps=7)
    for a, b, c in zip(models[0].members, models[1].members, models[3].members):
        _same(_weights(a), _weights(b), atol=1e-6)
        _same(_weights(b), _weights(c))  # bit for bit
    assert models[1].exchange.outer_steps == models[3].exchange.outer_steps == 2


def test_outer_state_round_trips_through_state_dict():
    model = _model(2, 2, keras.optimizers.SGD(0.2), outer_sgd(0.7, 0.9))
    model.fit(_dataset(_island_batches(4, 2)), epochs=1, verbose=0)
    state = model.exchange.state_dict()
    assert any(np.any(state[k] != 0) for k in state if k.startswith("outer") and k != "outer_steps")
    other = _model(2, 2, keras.optimizers.SGD(0.2), outer_sgd(0.7, 0.9), seed=5)
    other.exchange.load_state_dict(state)
    _same(other.exchange.state_dict().values(), state.values())


def test_islands_that_codistil_with_their_peers_read_the_peers_predictions_every_step():
    """teacher="peers": the distillation term is D(the other island's
    predictions on this island's batch, own), at every step, outer steps
    included; the bytes add the predictions to the averaging."""
    every, islands = 3, 2
    model = _model(islands, every, keras.optimizers.SGD(0.2), alpha=0.5, teacher="peers")
    for step, batch in enumerate(_island_batches(7, islands)):
        xs, ys = tuple(b[0] for b in batch), tuple(b[1] for b in batch)
        teachers = [model.members[1](xs[0], training=False), model.members[0](xs[1], training=False)]
        expected = [
            float(model.distance.compute_loss(t, model.members[i](xs[i], training=False)))
            for i, t in enumerate(teachers)
        ]
        logs = model.train_on_batch(xs, ys, return_dict=True)
        if step == 0:  # the islands start identical (group 0's weights): no term at the first step
            assert float(logs["distill_loss"]) == pytest.approx(0.0, abs=1e-6)
        elif step % every == 0:  # right after an outer step the islands are identical again
            assert float(logs["distill_loss"]) == pytest.approx(0.0, abs=1e-6)
        else:  # the mean of both members' terms against their peer's predictions (not the shared weights)
            assert min(expected) > 1e-6
            assert float(logs["distill_loss"]) == pytest.approx(np.mean(expected), rel=1e-4)
    model.finish_batch_training()
    # The across-process protocol's bytes: the batch's inputs out, the peer's predictions back.
    sent = model.exchange.bytes_sent_per_step(16, 10, 1000)
    assert sent == pytest.approx(2 * 1 / 2 * 1000 * 4 / every + 16 * (int(np.prod(INPUT)) + 10) * 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(every=0), ValueError, "every must be >= 1"),
        (dict(every=2, teacher="nope"), ValueError, "teacher must be one of"),
        (dict(every=2, outer_optimizer="sgd"), TypeError, "outer_optimizer must be a keras"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        AveragingExchange(**kwargs)


def test_bad_outer_settings_fail_clearly():
    with pytest.raises(ValueError, match="outer momentum must be in"):
        outer_sgd(0.7, 1.0)
    with pytest.raises(ValueError, match="outer learning rate must be"):
        outer_sgd(0.0, 0.9)


# ------------------------------------------------------------------ train.py and Horovod
AVERAGE = ["--mode=codistill", "--exchange=average", "--exchange_every=10", "--num_groups=2"]


def _steps(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("teacher", ["none", "peers"])
def test_two_processes_average_like_one_process(tmp_path, data_dir, mnist1d_spec, horovod_installed, teacher):
    """A 2-process Horovod job (one island per process) follows the
    one-process run step by step, and its islands end identical (the run
    ends on an outer step). With --average_teacher=peers the islands also
    distil toward each other's predictions on their own batches every step:
    in one process the other island's model runs on the batch, across
    processes the inputs travel out and the predictions back."""
    steps = 40
    common = ["--dataset=mnist1d", "--model=cnn1d", "--batch_size=64", f"--steps={steps}", "--verbose=0"]
    common += ["--warmup_epochs=0.2", "--collective_timeout=60", f"--data_dir={data_dir}", *AVERAGE]
    if teacher == "peers":
        common += ["--alpha=0.5", "--average_teacher=peers"]
    local = subprocess.run(
        [sys.executable, "train.py", *common, f"--workdir={tmp_path / 'local'}"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    job = subprocess.run(
        horovodrun(2, sys.executable, "train.py", *common, f"--workdir={tmp_path / 'hvd'}"),
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    run = json.loads((tmp_path / "hvd" / "results.json").read_text())["runs"][0]
    assert run["exchange"] == "average" and run["world_size"] == 2
    assert run["alpha"] == (0.5 if teacher == "peers" else 0.0)
    assert run["outer_steps"] == steps // 10
    assert len({r["weights_checksum"] for r in run["ranks"]}) == 1, run["ranks"]
    # A ring all-reduce of the parameters between 2 islands every 10 steps; with peers, every step
    # 32 examples' inputs (40 values each) out and the peer's 10 logits on them back.
    peers = 32 * (40 + 10) * 4 if teacher == "peers" else 0
    assert run["bytes_cross_group_per_step"] == pytest.approx(run["params_per_model"] * 4 / 10 + peers)
    local_run = json.loads((tmp_path / "local" / "results.json").read_text())["runs"][0]
    assert local_run["bytes_equivalent_per_step"] == pytest.approx(run["bytes_cross_group_per_step"])
    one = _steps(tmp_path / "local" / "codistill" / "steps.jsonl")
    ranks = [_steps(tmp_path / "hvd" / "codistill" / f"steps.rank{r}.jsonl") for r in (0, 1)]
    for k in range(steps):
        for g in (0, 1):
            assert ranks[g][k]["task_loss"] == pytest.approx(one[k][f"g{g}_task_loss"], abs=1e-5)
        if teacher == "peers":  # the islands' mean term (one process logs the mean over members)
            mean = (ranks[0][k]["distill_loss"] + ranks[1][k]["distill_loss"]) / 2
            assert mean == pytest.approx(one[k]["distill_loss"], abs=1e-5)
    if teacher == "peers":  # the term is there between outer steps (the islands differ)
        assert max(ranks[0][k]["distill_loss"] for k in range(steps)) > 1e-4
    for a, b in zip(local_run["groups"], run["groups"], strict=True):
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1e-3)
        assert a["test_loss"] == pytest.approx(local_run["groups"][0]["test_loss"])  # identical islands


def test_averaging_islands_that_codistil_resume_exactly(tmp_path, tmp_path_factory, data_dir, mnist1d_spec):
    """Killed mid-round (H = 25, backups every 62 steps), resumed: the
    outer momentum, the shared weights and the teacher come back."""
    extra = [*CODISTILL, "--exchange=average", "--exchange_every=25", "--alpha=0.5"]
    run = _kill_and_resume(tmp_path, tmp_path_factory, data_dir, 1, extra, "codistill", 0)
    assert run["exchange"] == "average" and run["outer_steps"] == STEPS // 25


def test_averaging_over_horovod_resumes_exactly(
    tmp_path, tmp_path_factory, data_dir, mnist1d_spec, horovod_installed
):
    extra = [*CODISTILL, "--exchange=average", "--exchange_every=25"]
    run = _kill_and_resume(tmp_path, tmp_path_factory, data_dir, 2, extra, "codistill", victim=1)
    assert run["world_size"] == 2 and run["alpha"] == 0.0


def test_islands_of_two_workers_each_through_the_runtime(tmp_path, horovod_installed):
    """examples/own_model.py (batch norm and dropout) as 2 islands x 2 MWMS
    workers: the islands end on an outer step, identical (statistics too)."""
    cmd = [sys.executable, "-m", "tf_codistill.launch", "--np", "4", "--groups", "2", "--timeout", "200"]
    cmd += ["--", "examples/own_model.py", "--steps=100", "--exchange=average", "--exchange_every=25"]
    proc = subprocess.run(
        [*cmd, f"--workdir={tmp_path}"],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert (run["num_groups"], run["world_size"], run["exchange"]) == (2, 4, "average")
    first, second = (g["test_accuracy"] for g in run["groups"])
    assert first == second and first > 0.7, run
    last = [json.loads(open(tmp_path / f"steps.rank{r}.jsonl").readlines()[-1]) for r in range(4)]
    assert all(step["alpha"] == 0.0 for step in last)


SHAPES_SCRIPT = r"""
import sys
from tf_codistill import topology
topo, _, pair_set = topology.init_horovod(2, timeout_s=30)
strategy = topology.make_group_strategy(topo)
from models import build_model
from tf_codistill import CodistillModel
from tf_codistill.exchange import AveragingExchange
member = build_model("mlp", (8,), 10 + topo.group)   # group 1 has 11 classes
try:
    CodistillModel([member], exchange=AveragingExchange(5, topology=topo, pair_set=pair_set))
except ValueError as err:
    print("ERROR:", err)
    sys.exit(3)
"""


def test_islands_of_different_models_fail_clearly(tmp_path, horovod_installed):
    script = tmp_path / "shapes.py"
    script.write_text(SHAPES_SCRIPT)
    proc = subprocess.run(
        horovodrun(2, sys.executable, str(script)),
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "parameter averaging needs every group to train the same architecture" in proc.stdout
    assert "group 1: 6 weights" in proc.stdout, proc.stdout[-2000:]


def test_the_runtime_makes_the_averaging_exchange():
    from tf_codistill import runtime

    rt = runtime.init(2, "average", exchange_every=5, outer_learning_rate=1.0, outer_momentum=0.0)
    assert (rt.data_mode, rt.group_seed(0) != rt.group_seed(1)) == ("independent", True)
    exchange = rt.exchange()
    assert isinstance(exchange, AveragingExchange) and exchange.every == 5
    assert float(exchange.outer_optimizer.learning_rate) == 1.0 and not exchange.outer_optimizer.nesterov
    for kwargs, match in [
        (dict(exchange_every=0), "exchange_every must be >= 1"),
        (dict(outer_momentum=1.0), "outer_momentum must be in"),
        (dict(outer_learning_rate=float("nan")), "outer_learning_rate must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            runtime.init(2, "average", **kwargs)
