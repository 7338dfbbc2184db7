"""How peer predictions reach each member: one interface, several transports."""

from tf_codistill.exchange.base import Exchange
from tf_codistill.exchange.factory import make_exchange
from tf_codistill.exchange.local import LocalExchange
from tf_codistill.exchange.weights import (
    DirectoryTransport,
    HorovodWeightsTransport,
    LocalTransport,
    StaleWeightsExchange,
)

__all__ = [
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
    # Imported lazily: Horovod is optional until a multi-process run needs it.
    if name == "HorovodExchange":
        from tf_codistill.exchange.horovod import HorovodExchange

        return HorovodExchange
    raise AttributeError(name)
