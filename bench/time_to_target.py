"""Which arm reaches the target first on which link: a projection from one
`bench_slow_network.py` run and the network sweep's fitted cost model.

    python bench/time_to_target.py docs/results/network/low_communication_100mbit.json

For every arm of the run: its one-off start-up (the measured seconds to the
target less its updates at the measured steady step: tracing, the first
collectives) plus the updates it took to reach the target (measured, read
once per epoch) times the cost model's step time on each link rate
(bench/costmodel.py with docs/results/network/costmodel.json: compute per
arm as fitted on this machine, bytes per step from tf_codistill.traffic).
Updates to target do not depend on the link (the same steps run slower or
faster); the step time does. The start-up is taken as the same on every
link. The step model's error at the run's own rate is printed beside it.

What it cannot say: the updates come from one seed and an evaluation every
epoch, so arms one epoch apart are not told apart; the compute constants are
this machine's CPU workers (on a GPU the compute shrinks and the network's
share, hence the low-communication arms' advantage, grows).

Standard library only: reads JSON, imports bench/costmodel.py and
bench_slow_network.py's arm tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import costmodel  # noqa: E402 - bench/ is not a package
from bench_slow_network import ARMS, COSTMODEL_ARM, COSTMODEL_JSON, INPUT_VALUES  # noqa: E402

TIE = 0.10  # arms this close to the fastest are not ordered


def load_params(path: str) -> costmodel.Params:
    with open(path) as f:
        fitted = json.load(f)
    p = fitted["params"]
    compute = {tuple(k.split("/", 1)): v for k, v in p["compute_seconds"].items()}
    return costmodel.Params(compute, efficiency=p["efficiency"], latency=p["latency_seconds"])


def project(run: dict, params: costmodel.Params, rates_mbit: list[float], cores: int) -> list[dict]:
    """One row per arm that reached the target: its updates and, per rate,
    the projected seconds to the target."""
    args = run["args"]
    rows = []
    for arm in run["arms"]:
        steps = arm.get("steps_to_target")
        if not steps or arm["arm"] not in COSTMODEL_ARM:
            continue
        measured = arm.get("seconds_to_target")
        steady = arm.get("steady_steps_per_second")
        startup = max(0.0, measured - steps / steady) if measured and steady else 0.0
        seconds = {}
        for rate in rates_mbit:
            point = costmodel.Point(
                args["model"], COSTMODEL_ARM[arm["arm"]], args["hosts"], rate, arm["params"],
                args["classes"], args["batch_size"] // args["hosts"], every=args["exchange_every"],
                inputs=INPUT_VALUES.get(args["dataset"].split("/")[0], 0), cores=cores,
            )  # fmt: skip
            seconds[rate] = startup + steps * params.step_seconds(point)
        rows.append(
            {
                "arm": arm["arm"],
                "label": ARMS[arm["arm"]][0].format(k=args["exchange_every"]),
                "steps_to_target": steps,
                "measured_seconds_to_target": measured,
                "startup_seconds": startup,
                "step_model_error": arm.get("prediction_error"),
                "projected_seconds": seconds,
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_json", help="a bench_slow_network.py --json output with steps_to_target per arm")
    ap.add_argument("--rates_mbit", default="10,100,1000,10000", help="link rates to project, Mbit/s")
    ap.add_argument("--costmodel", default=COSTMODEL_JSON)
    ap.add_argument("--cores", type=int, default=2, help="cores the workers share (0: one machine each)")
    args = ap.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates_mbit.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rates_mbit={args.rates_mbit!r}: give numbers separated by commas, e.g. 10,100,1000")
    if not rates or min(rates) <= 0:
        ap.error(f"--rates_mbit={args.rates_mbit!r}: every rate must be > 0")
    for path in (args.run_json, args.costmodel):
        if not os.path.exists(path):
            ap.error(
                f"{path}: no such file (run bench/bench_slow_network.py --json=... or bench/sweep_network.py)"
            )
    with open(args.run_json) as f:
        run = json.load(f)
    if not run.get("args", {}).get("target_accuracy"):
        ap.error(f"{args.run_json}: the run had no --target_accuracy, so no updates to target to project")
    rows = project(run, load_params(args.costmodel), rates, args.cores)
    if not rows:
        print(f"no arm of {args.run_json} reached its target")
        return 1
    a = run["args"]
    print(
        f"time to {a['target_accuracy']} test accuracy: {a['model']} on {a['dataset']}, {a['hosts']} workers, "
        f"batch {a['batch_size']}; updates measured at {a['rate_mbit']:g} Mbit/s (one seed, read every epoch), "
        f"step time from the cost model ({os.path.relpath(args.costmodel)})"
    )
    head = f"{'arm':36s} {'updates':>7s} {'start-up':>8s} " + " ".join(f"{r:>9g}M" for r in rates)
    head += f"  {'measured at ' + format(a['rate_mbit'], 'g') + 'M':>16s} {'step model error':>16s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(f"{r['projected_seconds'][x]:9.2f}s" for x in rates)
        measured = r["measured_seconds_to_target"]
        err = r["step_model_error"]
        print(
            f"{r['label']:36s} {r['steps_to_target']:7d} {r['startup_seconds']:7.2f}s {cells}  "
            f"{'-' if measured is None else f'{measured:15.2f}s'} {'-' if err is None else f'{err:+16.0%}'}"
        )
    print()
    print(
        f"first on each link (arms within {TIE:.0%} of the fastest are listed with it: one seed cannot order them)"
    )
    for x in rates:
        ranked = sorted(rows, key=lambda r: r["projected_seconds"][x])
        best = ranked[0]["projected_seconds"][x]
        tied = [r["label"] for r in ranked if r["projected_seconds"][x] <= best * (1 + TIE)]
        sync = next((r for r in rows if r["arm"] == "sync"), None)
        versus = "" if sync is None else f"; sync takes {sync['projected_seconds'][x] / best:.1f}x as long"
        print(f"  {x:g} Mbit/s: {' | '.join(tied)}{versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
