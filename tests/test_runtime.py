"""tf_codistill.runtime in one process: what init decides, what it hands out,
and one clear line for every bad argument. (The same API across processes:
tests/test_own_model.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_codistill as tfc
from tf_codistill import runtime
from tf_codistill.exchange import StaleWeightsExchange


def _stream(seed, batch=4):
    x = np.arange(40, dtype="float32").reshape(20, 2)
    y = np.arange(20) % 3
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(20, seed=seed).repeat().batch(batch)


def test_one_process_trains_every_group_with_the_model_s_local_exchange():
    rt = runtime.init(3, "predictions")
    assert (rt.distributed, rt.world_size, rt.rank, rt.is_chief) == (False, 1, 0, True)
    assert rt.local_groups == (0, 1, 2) and rt.data_mode == "shared"
    with rt.scope():
        assert rt.exchange() is None  # CodistillModel's own local exchange
        members = rt.members(
            lambda g: keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)], name=f"m{g}")
        )
    assert [m.name for m in members] == ["m0", "m1", "m2"]
    assert rt.gather({"a": 1}) == [{"a": 1}]


def test_predictions_give_every_group_the_same_batches():
    rt = runtime.init(2, "predictions", seed=7)
    assert rt.group_seed(0) == rt.group_seed(1) == 7
    x, y = next(iter(rt.dataset(_stream)))
    assert x.shape == (4, 2) and y.shape == (4,)  # one stream: every member gets it


def test_weights_give_each_group_its_own_order():
    rt = runtime.init(2, "weights", exchange_every=5, seed=3)
    assert rt.data_orders == "independent" and rt.data_mode == "independent"
    assert (rt.group_seed(0), rt.group_seed(1)) == (3, 1003)
    (x0, x1), (y0, y1) = next(iter(rt.dataset(_stream)))
    assert x0.shape == x1.shape == (4, 2) and not np.array_equal(x0, x1)
    with rt.scope():
        exchange = rt.exchange()
    assert isinstance(exchange, StaleWeightsExchange) and exchange.every == 5


def test_the_data_order_depends_on_the_seed_alone():
    """Whatever TensorFlow's global seed was set to before (e.g. by seeding a
    member's weights), the same seed gives the same batches."""
    rt = runtime.init(1, seed=11)
    keras.utils.set_random_seed(123)
    first = next(iter(rt.dataset(_stream)))[0].numpy()
    keras.utils.set_random_seed(456)
    second = next(iter(rt.dataset(_stream)))[0].numpy()
    np.testing.assert_array_equal(first, second)


def test_one_group_is_the_sync_baseline():
    rt = runtime.init(1, "weights")
    assert rt.data_mode == "shared" and rt.local_groups == (0,)
    with rt.scope():
        assert rt.exchange() is None


def test_a_separate_group_job_trains_its_own_group(tmp_path):
    rt = runtime.init(2, "weights", exchange_dir=str(tmp_path), group=1, seed=2)
    assert rt.local_groups == (1,) and rt.group == 1 and rt.separate_group
    assert rt.group_seed(1) == 1002
    with rt.scope():
        exchange = rt.exchange()
    assert exchange.transport.name == "directory" and exchange.group == 1


def test_member_scores_name_every_member():
    members = [keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]) for _ in range(2)]
    model = tfc.CodistillModel(members, data_mode="shared")
    assert model.member_scores({"g0_accuracy": 0.5, "g1_accuracy": 0.75}) == [0.5, 0.75]
    single = tfc.CodistillModel(members[:1])
    assert single.member_scores({"accuracy": 0.25}) == [0.25]


def test_precision_sets_the_dtype_policy():
    try:
        runtime.init(1, precision="mixed_bfloat16")
        assert keras.mixed_precision.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_groups=0), ValueError, "num_groups"),
        (dict(num_groups="2"), TypeError, "num_groups"),
        (dict(exchange="gradients"), ValueError, "exchange must be one of"),
        (dict(exchange_every=-1), ValueError, "exchange_every"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(data_mode="mixed"), ValueError, "data_mode"),
        (dict(peer_timeout=float("nan")), ValueError, "peer_timeout"),
        (dict(collective_timeout=0), ValueError, "collective_timeout"),
        (dict(on_stale="wait"), ValueError, "on_stale"),
        (dict(precision="float16"), ValueError, "precision"),
        (dict(collective_implementation="mpi"), ValueError, "collective_implementation"),
        (dict(exchange_dir="/tmp/x"), ValueError, "exchange_dir is for the weights exchange"),
        (dict(exchange="weights", exchange_dir="/tmp/x"), ValueError, "pass group in"),
        (dict(exchange="weights", exchange_dir="/tmp/x", group=2), ValueError, "pass group in"),
        (dict(group=0), ValueError, "group only applies with exchange_dir"),
        (dict(tpu="local"), ValueError, "Horovod does not run on TPUs"),
        (dict(tpu=""), ValueError, "tpu must be"),
    ],
)
def test_bad_arguments_are_one_clear_line(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        runtime.init(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_functions_are_named():
    rt = runtime.init(2)
    with pytest.raises(TypeError, match="dataset_fn must be a function"):
        rt.dataset([1, 2])
    with pytest.raises(TypeError, match="must return a tf.data.Dataset"):
        rt.dataset(lambda seed: [1, 2])
    with pytest.raises(TypeError, match="builder must be a function"):
        rt.members("cnn1d")
