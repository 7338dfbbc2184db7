"""tf_codistill: codistillation for TensorFlow/Keras (Sinha et al., 2021).

Several models ("groups") train side by side; each adds
`alpha * D(own logits, mean of the peers' logits)` to its task loss. With one
group the same code is the synchronous baseline.

Names are imported on first use, so that `python -m tf_codistill.launch`
starts without loading TensorFlow. When Keras is already imported, the
modules that register classes with Keras serialisation (the model, distances,
schedules) are imported at once, so that `keras.models.load_model` finds them:
`import keras` (or tensorflow) before `import tf_codistill`, or touch any name
(`tf_codistill.CodistillModel`) before loading.
"""

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "AlphaSchedule": "tf_codistill.schedules",
    "Backup": "tf_codistill.backup",
    "BackupError": "tf_codistill.backup",
    "CodistillLoop": "tf_codistill.loop",
    "CodistillModel": "tf_codistill.model",
    "Exchange": "tf_codistill.exchange",
    "HorovodExchange": "tf_codistill.exchange",
    "KLDivergence": "tf_codistill.losses",
    "KerasDistillationDistance": "tf_codistill.losses",
    "PeerFailureError": "tf_codistill.callbacks",
    "PeerHealthCheck": "tf_codistill.callbacks",
    "StaleWeightsRefresh": "tf_codistill.callbacks",
    "training_callbacks": "tf_codistill.callbacks",
    "LocalExchange": "tf_codistill.exchange",
    "LogitMSE": "tf_codistill.losses",
    "PiecewiseConstant": "tf_codistill.schedules",
    "Preempted": "tf_codistill.preemption",
    "PreemptionHandler": "tf_codistill.preemption",
    "ReverseKLDivergence": "tf_codistill.losses",
    "StaleWeightsExchange": "tf_codistill.exchange",
    "DirectoryTransport": "tf_codistill.exchange",
    "Topology": "tf_codistill.topology",
    "WarmupCosineDecay": "tf_codistill.schedules",
    "WarmupPiecewiseDecay": "tf_codistill.schedules",
    "get_distance": "tf_codistill.losses",
    "paper_weight_decay": "tf_codistill.schedules",
}
_MODULES = ("runtime", "exchange", "data", "losses", "schedules")

__all__ = sorted([*_EXPORTS, *_MODULES])


_SUBMODULES = ("callbacks", "exchange", "losses", "schedules")


# Modules whose classes Keras deserialises by their registered names.
_REGISTERING = ("tf_codistill.model", "tf_codistill.losses", "tf_codistill.schedules")


def _register_keras_objects() -> None:
    for module in _REGISTERING:
        importlib.import_module(module)


if "keras" in sys.modules or "tensorflow" in sys.modules:
    _register_keras_objects()


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tf_codistill.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"tf_codistill.{name}")
    raise AttributeError(f"module 'tf_codistill' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
