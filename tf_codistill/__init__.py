"""tf_codistill: codistillation for TensorFlow/Keras (Sinha et al., 2021).

Several models ("groups") train side by side; each adds
`alpha * D(own logits, mean of the peers' logits)` to its task loss. With one
group the same code is the synchronous baseline.
"""

from tf_codistill.exchange import Exchange, LocalExchange
from tf_codistill.losses import KLDivergence, LogitMSE, ReverseKLDivergence, get_distance
from tf_codistill.model import CodistillModel
from tf_codistill.schedules import (
    AlphaSchedule,
    PiecewiseConstant,
    WarmupCosineDecay,
    WarmupPiecewiseDecay,
    paper_weight_decay,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaSchedule",
    "CodistillModel",
    "Exchange",
    "KLDivergence",
    "LocalExchange",
    "LogitMSE",
    "PiecewiseConstant",
    "ReverseKLDivergence",
    "WarmupCosineDecay",
    "WarmupPiecewiseDecay",
    "get_distance",
    "paper_weight_decay",
]
