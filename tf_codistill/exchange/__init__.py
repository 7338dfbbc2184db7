"""How peer predictions reach each member: one interface, several transports."""

from tf_codistill.exchange.base import Exchange
from tf_codistill.exchange.local import LocalExchange

__all__ = ["Exchange", "LocalExchange", "HorovodExchange"]


def __getattr__(name):
    # Imported lazily: Horovod is optional until a multi-process run needs it.
    if name == "HorovodExchange":
        from tf_codistill.exchange.horovod import HorovodExchange

        return HorovodExchange
    raise AttributeError(name)
