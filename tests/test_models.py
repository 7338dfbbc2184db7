import numpy as np
import pytest

from models import MODELS, build_model, count_params

SHAPES = {
    "cnn1d": (40,),
    "cnn1d_norm": (40,),
    "mlp": (40,),
    "resnet20": (32, 32, 3),
    "resnet50": (64, 64, 3),
    "transformer": (12,),
}
# Logits per example, or per position for the language model.
OUTPUTS = {"transformer": (12, 7)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_builder_has_the_same_signature_and_emits_logits(name):
    model = build_model(name, SHAPES[name], 7, seed=0)
    x = np.zeros((2, *SHAPES[name]), "int32" if name == "transformer" else "float32")
    assert model(x).shape == (2, *OUTPUTS.get(name, (7,)))
    assert model.layers[-1].get_config().get("activation") in (None, "linear")


def test_seed_makes_initial_weights_reproducible():
    a, b, c = (build_model("cnn1d", (40,), 10, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights()))
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_sizes():
    assert count_params(build_model("resnet20", (32, 32, 3), 10)) == pytest.approx(272_000, rel=0.02)
    assert count_params(build_model("cnn1d", (40,), 10)) < 20_000


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="Unknown model 'vgg'"):
        build_model("vgg", (32, 32, 3), 10)
    with pytest.raises(ValueError, match="resnet50 takes images"):
        build_model("resnet50", (40,), 10)
