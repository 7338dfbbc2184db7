"""How peer predictions reach each member: one interface, several transports."""

from tf_codistill.exchange.base import Exchange
from tf_codistill.exchange.local import LocalExchange

__all__ = ["Exchange", "LocalExchange"]
