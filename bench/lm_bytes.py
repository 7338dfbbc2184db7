"""Bytes per step of the two exchanges for a language model: predictions
(every step, [batch, context, vocabulary] float32 logits to each other group)
against weights (the parameters, float32, to each other group every K steps),
and the ring all-reduce sync would send; the formulas of
tf_codistill/exchange/horovod.py, exchange/weights.py and report.py.

    python bench/lm_bytes.py      # prints the markdown table of docs/choosing.md
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def predictions(groups: int, batch: int, context: int, vocabulary: int) -> float:
    return (groups - 1) * batch * context * vocabulary * 4.0


def weights(groups: int, params: int, every: int) -> float:
    return (groups - 1) * params * 4.0 / every


def allreduce(workers: int, params: int) -> float:
    return 2 * (workers - 1) / workers * params * 4.0


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models import build_model, count_params

    small = count_params(build_model("transformer", (64,), 65, layers=4, heads=4, width=128))
    shapes = [
        ("this repository's Transformer (4 x 128, context 64, 65 symbols)", small, 64, 65, 6),
        ("GPT-2 small shape (12 x 768, context 1,024, 50,257 tokens)", 124_000_000, 1024, 50_257, 8),
    ]
    print(
        "| model | parameters | per-group batch | predictions, every step | weights, K = 50 | weights, K = 500 "
        "| K where weights = predictions | sync all-reduce (2 workers) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, params, context, vocabulary, batch in shapes:
        p = predictions(2, batch, context, vocabulary)
        print(
            f"| {name} | {params:,} | {batch} sequences | {p / 1e6:,.2f} MB | {weights(2, params, 50) / 1e6:,.3f} MB "
            f"| {weights(2, params, 500) / 1e6:,.4f} MB | {params * 4 / p:,.1f} | {allreduce(2, params) / 1e6:,.1f} MB |"
        )


if __name__ == "__main__":
    main()
