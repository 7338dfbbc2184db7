"""How peer predictions reach each member: one interface, several transports.

Names are imported on first use: Horovod is only needed once a
multi-process run uses it. The kinds and transports are
`tf_codistill.choices.EXCHANGE_KINDS` and `TRANSPORTS`.
"""

import importlib

from tf_codistill.exchange.factory import make_exchange

_EXPORTS = {
    "AveragingExchange": "tf_codistill.exchange.average",
    "Exchange": "tf_codistill.exchange.base",
    "LocalExchange": "tf_codistill.exchange.local",
    "HorovodExchange": "tf_codistill.exchange.horovod",
    "DirectoryTransport": "tf_codistill.exchange.weights",
    "HorovodWeightsTransport": "tf_codistill.exchange.weights",
    "LocalTransport": "tf_codistill.exchange.weights",
    "StaleWeightsExchange": "tf_codistill.exchange.weights",
}

__all__ = [  # noqa: F822 - the classes come through __getattr__
    "AveragingExchange",
    "DirectoryTransport",
    "Exchange",
    "HorovodExchange",
    "HorovodWeightsTransport",
    "LocalExchange",
    "LocalTransport",
    "StaleWeightsExchange",
    "make_exchange",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tf_codistill.exchange' has no attribute {name!r}")
