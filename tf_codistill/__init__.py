"""tf_codistill: codistillation for TensorFlow/Keras (Sinha et al., 2021).

Several models ("groups") train side by side; each adds
`alpha * D(own logits, mean of the peers' logits)` to its task loss. With one
group the same code is the synchronous baseline.

Names are imported on first use, so that `python -m tf_codistill.launch`
starts without loading TensorFlow.
"""

import importlib

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
    "LocalExchange": "tf_codistill.exchange",
    "LogitMSE": "tf_codistill.losses",
    "PiecewiseConstant": "tf_codistill.schedules",
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


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"tf_codistill.{name}")
    raise AttributeError(f"module 'tf_codistill' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
