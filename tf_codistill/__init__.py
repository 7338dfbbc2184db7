"""tf_codistill: codistillation for TensorFlow/Keras (Sinha et al., 2021).

Several models ("groups") train side by side; each adds
`alpha * D(own logits, mean of the peers' logits)` to its task loss. With one
group the same code is the synchronous baseline.

Names are imported on first use, so that `python -m tf_codistill.launch`
and `train.py --help` start without loading TensorFlow. The classes Keras
deserialises by their registered names (the model, distances, schedules) are
registered as soon as Keras is loaded, whichever comes first: `import keras`
(or tensorflow) before `import tf_codistill`, or after it. So
`import tf_codistill` is all `keras.models.load_model` needs.
"""

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "AlphaSchedule": "tf_codistill.schedules",
    "AveragingExchange": "tf_codistill.exchange",
    "Backup": "tf_codistill.backup",
    "BackupError": "tf_codistill.backup",
    "CodistillLoop": "tf_codistill.loop",
    "CodistillModel": "tf_codistill.model",
    "Exchange": "tf_codistill.exchange",
    "HorovodExchange": "tf_codistill.exchange",
    "KLDivergence": "tf_codistill.losses",
    "KerasDistillationDistance": "tf_codistill.losses",
    "ParameterAveraging": "tf_codistill.callbacks",
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
_MODULES = ("runtime", "exchange", "data", "losses", "schedules", "seeds")

__all__ = sorted([*_EXPORTS, *_MODULES])


_SUBMODULES = ("callbacks", "exchange", "losses", "schedules")


# Modules whose classes Keras deserialises by their registered names.
_REGISTERING = ("tf_codistill.model", "tf_codistill.losses", "tf_codistill.schedules")
# Loading either of these loads Keras (TensorFlow imports it while it loads).
_KERAS = ("keras", "tensorflow")


def _register_keras_objects() -> None:
    for module in _REGISTERING:
        importlib.import_module(module)


def _initializing(name: str) -> bool:
    """Whether module `name` is imported and its code still running."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Registers the Keras classes once Keras has loaded after this package.

    Python has no post-import hook, so this finder wraps the loader of Keras,
    TensorFlow and this package's modules: after each finishes, if Keras is
    loaded and none of them is still running (TensorFlow imports Keras while
    it loads; `tf_codistill.losses` imports Keras at its top, and the model
    imports `losses`), it imports the registering modules and removes itself.
    """

    def __init__(self):
        self._finding = False

    def _watched(self, name: str) -> bool:
        return name in _KERAS or name.startswith("tf_codistill.")

    def find_spec(self, name, path=None, target=None):
        if self._finding or not self._watched(name):
            return None
        self._finding = True
        try:
            spec = next(
                (
                    found
                    for finder in sys.meta_path
                    if finder is not self
                    and hasattr(finder, "find_spec")
                    and (found := finder.find_spec(name, path, target)) is not None
                ),
                None,
            )
        finally:
            self._finding = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            self._after(name)

        loader.exec_module = exec_module  # this module's own loader object only
        return spec

    def _after(self, finished: str) -> None:
        if not any(name in sys.modules for name in _KERAS):
            return
        running = [
            name
            for name in list(sys.modules)
            if name != finished and self._watched(name) and _initializing(name)
        ]
        if running or _initializing("tf_codistill"):
            return  # the last of them to finish registers
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_keras_objects()


if any(name in sys.modules for name in _KERAS):
    _register_keras_objects()
elif not any(isinstance(finder, _RegisterWhenKerasLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())


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
