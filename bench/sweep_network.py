"""Sweep of the slow-network benchmark over link rates, models and host
counts, with the cost model's prediction beside every measurement.

    sudo .venv/bin/python bench/sweep_network.py [--out=docs/results/network] [--steps=200]
    sudo .venv/bin/python bench/sweep_network.py --estimate        # the plan and its time, runs nothing
    .venv/bin/python bench/sweep_network.py --refit_only           # refit, rewrite predictions and plot

Points (default): link rates 10 / 100 / 1,000 Mbit/s x models `mlp_wide`
(1,076,010 parameters) and `resnet20` (272,474) on 2 hosts, plus both models
on 4 hosts at 100 Mbit/s; each point runs bench/bench_slow_network.py once
for its missing arms: sync (MWMS across hosts), codistillation with
per-step predictions, stale weights every 50 steps. Same steps, global
batch 64 and seed in every arm of a point; digits. `--steps` (200) updates
per model, except where `--steps_at` says otherwise (10 Mbit/s: 100, since
sync's gradient all-reduce takes seconds per step there). Time-to-target
targets per model: `--target` (mlp_wide 0.9, resnet20 0.8 test accuracy).

Budget: `--estimate` prints every missing point's expected seconds (the
cost model fitted on the rows there are, else `PRIOR`, plus start-up);
the default sweep estimates about 35 minutes on 2 otherwise idle cores
(allow 60: start-up varies). Run it on an idle machine: the workers are
CPU-bound and another job's load shows up as compute time (each row
records the 1-minute load average at its start).

Resumable: a row of `<out>/sweep.csv` is one (model, hosts, rate, arm,
steps) point; points with a row are skipped, so a killed sweep restarted
with the same flags goes on where it stopped. Each point's full summary is
kept in `<out>/runs/<model>-h<hosts>-r<rate>-s<steps>.json`. After every
point the cost model (bench/costmodel.py) is refitted on the fitting
points (`costmodel.default_fit_role`: every arm at the fastest link with 2
hosts, and sync at 100 Mbit/s with 2 and 4 hosts), every row gets its prediction
and relative error, and `<out>/sweep.png` (speedup over sync against link
rate) and `<out>/costmodel.json` (the fitted constants, the held-out
errors) are rewritten.

Measured step time is the steady one (epochs after the first, which
traces the step function; from the `epoch_seconds` train.py records).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import costmodel  # noqa: E402

BENCH = os.path.join(HERE, "bench_slow_network.py")
CLASSES = {"digits": 10, "mnist1d": 10}
ARMS = ("sync", "predictions", "weights")
COLUMNS = [
    "model", "params", "classes", "hosts", "rate_mbit", "arm", "steps", "batch_per_worker",
    "exchange_every", "link_mbit_measured", "steps_per_second", "steady_steps_per_second", "step_ms",
    "speedup_vs_sync", "bytes_accounted_per_step", "bytes_wire_tx_per_step", "bytes_wire_rx_per_step",
    "wire_over_accounted", "target_accuracy", "epochs_to_target", "steps_to_target",
    "seconds_to_target", "time_to_target_speedup_vs_sync", "test_accuracy", "predicted_step_ms",
    "predicted_speedup_vs_sync", "prediction_error", "role", "loadavg_1m", "measured_at",
]  # fmt: skip
# Startup and teardown of one arm (processes, TF import, rendezvous, MWMS)
# plus one epoch's tracing, seconds on 2 cores: for --estimate.
ARM_OVERHEAD_S = {"sync": 25.0, "predictions": 12.0, "weights": 12.0}
TRACE_S = {"mlp_wide": 2.0, "resnet20": 12.0}  # the first epoch's tracing (measured on the check points)
# A prior for --estimate before anything is measured (fitted on the short
# points of docs/results/network/check/, 60 steps, 2 cores).
PRIOR = costmodel.Params(
    compute={
        ("mlp_wide", "sync"): 0.027,
        ("mlp_wide", "predictions"): 0.022,
        ("mlp_wide", "weights"): 0.020,
        ("resnet20", "sync"): 0.036,
        ("resnet20", "predictions"): 0.051,
        ("resnet20", "weights"): 0.215,
    },
    efficiency=0.67,
    latency=0.0,
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "docs", "results", "network"))
    p.add_argument("--rates", default="10,100,1000", help="Mbit/s, comma-separated")
    p.add_argument("--models", default="mlp_wide,resnet20")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument(
        "--extra", default="4x100", help="more HOSTSxRATE points for every model, comma-separated ('' none)"
    )
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=200, help="updates per model in every arm")
    p.add_argument(
        "--steps_at",
        default="10=100",
        help="RATE=STEPS overrides for slow links (comma-separated): sync there takes seconds per step",
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch_size", type=int, default=64, help="global batch")
    p.add_argument("--exchange_every", type=int, default=50)
    p.add_argument("--target", default="mlp_wide=0.9,resnet20=0.8", help="test accuracy target per model")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="for the oversubscription term")
    p.add_argument("--point_timeout", type=float, default=1500.0, help="bound on one point (s)")
    p.add_argument("--estimate", action="store_true", help="print the plan and its estimated time only")
    p.add_argument("--refit_only", action="store_true", help="no runs: refit, predictions, plot")
    p.add_argument("--ingest", nargs="*", default=[], help="bench --json files to add as rows, then refit")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.models = [m for m in args.models.split(",") if m]
    args.arms = [a for a in args.arms.split(",") if a]
    args.target = {k: float(v) for k, v in (kv.split("=") for kv in args.target.split(",") if kv)}
    args.steps_at = {float(k): int(v) for k, v in (kv.split("=") for kv in args.steps_at.split(",") if kv)}
    args.points = [(m, args.hosts, r) for m in args.models for r in args.rates]
    for extra in [e for e in args.extra.split(",") if e]:
        hosts, rate = extra.lower().split("x")
        args.points += [(m, int(hosts), float(rate)) for m in args.models]
    return args


# ---------------------------------------------------------------------- csv
def key(row) -> tuple:
    return (row["model"], int(row["hosts"]), float(row["rate_mbit"]), row["arm"], int(row["steps"]))


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_rows(path: str, rows: list[dict]) -> None:
    rows = sorted(
        rows, key=lambda r: (r["model"], int(r["hosts"]), float(r["rate_mbit"]), ARMS.index(r["arm"]))
    )
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in COLUMNS})
    os.replace(tmp, path)


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _num(v):
    return None if v in (None, "") else float(v)


def rows_from_summary(summary: dict, loadavg: float | None) -> list[dict]:
    """One row per arm of a bench_slow_network.py --json summary."""
    a = summary["args"]
    classes = CLASSES.get(a["dataset"], 10)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    link = (summary.get("link_check") or {}).get("mbit_s")
    out = []
    for r in summary["arms"]:
        steady = r.get("steady_steps_per_second")
        seconds = r.get("epoch_seconds") or []
        if steady is None and len(seconds) >= 2:  # a summary from before the field existed
            first = -(-r["steps"] // r["epochs"])
            steady = (r["steps"] - first) / sum(seconds[1:])
        steady = steady or r["steps_per_second"]
        wire = r.get("wire_tx_bytes_per_step")
        out.append(
            {
                "model": a["model"],
                "params": r["params"],
                "classes": classes,
                "hosts": a["hosts"],
                "rate_mbit": float(a["rate_mbit"]),
                "arm": r["arm"],
                "steps": r["steps"],
                "batch_per_worker": a["batch_size"] // a["hosts"],
                "exchange_every": a["exchange_every"],
                "link_mbit_measured": link,
                "steps_per_second": r["steps_per_second"],
                "steady_steps_per_second": steady,
                "step_ms": 1000.0 / steady,
                "bytes_accounted_per_step": r["bytes_sent_per_step"],
                "bytes_wire_tx_per_step": wire,
                "bytes_wire_rx_per_step": r.get("wire_rx_bytes_per_step"),
                "wire_over_accounted": wire / r["bytes_sent_per_step"]
                if wire is not None and r["bytes_sent_per_step"]
                else None,
                "target_accuracy": a["target_accuracy"],
                "epochs_to_target": r["epochs_to_target"],
                "steps_to_target": r["steps_to_target"],
                "seconds_to_target": r["seconds_to_target"],
                "test_accuracy": r["test_accuracy"],
                "loadavg_1m": loadavg,
                "measured_at": when,
            }
        )
    return out


# -------------------------------------------------------------------- model
def point_of(row, cores: int) -> costmodel.Point:
    return costmodel.Point(
        model=row["model"],
        arm=row["arm"],
        workers=int(row["hosts"]),
        rate_mbit=float(row["rate_mbit"]),
        params=int(row["params"]),
        classes=int(row["classes"]),
        batch=int(row["batch_per_worker"]),
        every=int(row["exchange_every"] or 50),
        cores=cores,
    )


def refit(rows: list[dict], cores: int) -> dict:
    """Fits the cost model, fills each row's prediction, error, role and
    speedups (in place). Returns the fit summary for costmodel.json."""
    summary: dict = {"fitted": False}
    if not rows:
        return summary
    rates = sorted({float(r["rate_mbit"]) for r in rows})
    points = [point_of(r, cores) for r in rows]
    seconds = [float(r["step_ms"]) / 1000 for r in rows]
    roles = [costmodel.default_fit_role(p, rates) for p in points]
    # Speedups over the sync row of the same (model, hosts, rate, steps).
    sync = {key(r)[:3] + (int(r["steps"]),): r for r in rows if r["arm"] == "sync"}
    for r in rows:
        s = sync.get(key(r)[:3] + (int(r["steps"]),))
        r["speedup_vs_sync"] = float(s["step_ms"]) / float(r["step_ms"]) if s else None
        mine, theirs = _num(r["seconds_to_target"]), _num(s["seconds_to_target"]) if s else None
        r["time_to_target_speedup_vs_sync"] = theirs / mine if mine and theirs else None
    try:
        params = costmodel.fit(points, seconds, roles)
    except ValueError as err:
        summary["error"] = str(err)
        return summary
    errors = []
    for r, p, t, role in zip(rows, points, seconds, roles):
        r["role"] = "fit" if role else "held-out"
        try:
            pred = params.step_seconds(p)
        except KeyError:  # no compute fitted for this (model, arm)
            r["predicted_step_ms"] = r["prediction_error"] = r["predicted_speedup_vs_sync"] = None
            continue
        r["predicted_step_ms"] = 1000 * pred
        r["prediction_error"] = costmodel.relative_error(pred, t)
        if not role:
            errors.append((abs(r["prediction_error"]), r))
    for r in rows:
        s = sync.get(key(r)[:3] + (int(r["steps"]),))
        if r.get("predicted_step_ms") is not None and s is not None:
            ps = params.step_seconds(point_of(s, cores))
            r["predicted_speedup_vs_sync"] = 1000 * ps / float(r["predicted_step_ms"])
    worst = max(errors, key=lambda e: e[0]) if errors else None
    summary = {
        "fitted": True,
        "params": params.to_dict(),
        "cores": cores,
        "fit_points": sum(roles),
        "held_out_points": len(errors),
        "held_out_within_25pct": sum(e < 0.25 for e, _ in errors),
        "worst_held_out": None
        if worst is None
        else {
            "relative_error": worst[1]["prediction_error"],
            "point": {k: worst[1][k] for k in ("model", "hosts", "rate_mbit", "arm")},
        },
    }
    return summary


# --------------------------------------------------------------------- plot
def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"mlp_wide": "tab:blue", "resnet20": "tab:orange"}
    styles = {"predictions": "o", "weights": "s"}
    labels = {"predictions": "predictions every step", "weights": "stale weights every 50"}
    hosts_main = min(int(r["hosts"]) for r in rows)
    for model in sorted({r["model"] for r in rows}):
        for arm in ("predictions", "weights"):
            sel = [
                r
                for r in rows
                if r["model"] == model and r["arm"] == arm and int(r["hosts"]) == hosts_main
                and r.get("speedup_vs_sync") not in (None, "")
            ]  # fmt: skip
            sel.sort(key=lambda r: float(r["rate_mbit"]))
            if not sel:
                continue
            c = colors.get(model)
            xs = [float(r["rate_mbit"]) for r in sel]
            ax.plot(
                xs,
                [float(r["speedup_vs_sync"]) for r in sel],
                marker=styles[arm],
                color=c,
                ls="-" if arm == "predictions" else "--",
                label=f"{model}, {labels[arm]} ({hosts_main} hosts)",
            )
            pred = [(x, r.get("predicted_speedup_vs_sync")) for x, r in zip(xs, sel)]
            pred = [(x, float(y)) for x, y in pred if y not in (None, "")]
            if pred:
                ax.plot(*zip(*pred), ls=":", color=c, alpha=0.6, marker="x", ms=5)
            more = [
                r
                for r in rows
                if r["model"] == model and r["arm"] == arm and int(r["hosts"]) != hosts_main
                and r.get("speedup_vs_sync") not in (None, "")
            ]  # fmt: skip
            for r in more:
                ax.scatter(
                    float(r["rate_mbit"]), float(r["speedup_vs_sync"]), marker=styles[arm], color=c,
                    facecolors="none", s=90, label=f"{model}, {labels[arm]} ({r['hosts']} hosts)",
                )  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate, each direction (Mbit/s, htb-shaped veth)")
    ax.set_ylabel("steps/s over sync (MWMS) steps/s")
    ax.set_title("Codistillation's per-step speedup over sync; x-marked dotted: cost model", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(args, rows: list[dict]) -> dict:
    summary = refit(rows, args.cores)
    write_rows(os.path.join(args.out, "sweep.csv"), rows)
    with open(os.path.join(args.out, "costmodel.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if rows:
        plot(rows, os.path.join(args.out, "sweep.png"))
    return summary


# ---------------------------------------------------------------------- run
def estimate(args, rows: list[dict]) -> float:
    """Seconds the missing points should take, from the cost model (fitted on
    the rows there are, else the prior) plus per-arm overheads."""
    fitted = refit([dict(r) for r in rows], args.cores)
    params = costmodel.Params(**{"compute": dict(PRIOR.compute)})
    params.efficiency, params.latency = PRIOR.efficiency, PRIOR.latency
    if fitted.get("fitted"):
        p = fitted["params"]
        params.efficiency, params.latency = p["efficiency"], p["latency_seconds"]
        for k, v in p["compute_seconds"].items():
            params.compute[tuple(k.split("/"))] = v
    done = {key(r) for r in rows}
    total = 0.0
    for model, hosts, rate in args.points:
        for arm in args.arms:
            steps = args.steps_at.get(rate, args.steps)
            if (model, hosts, rate, arm, steps) in done:
                continue
            pt = costmodel.Point(
                model, arm, hosts, rate, {"mlp_wide": 1_076_010, "resnet20": 272_474}.get(model, 1_000_000),
                CLASSES.get(args.dataset, 10), args.batch_size // hosts, args.exchange_every, cores=args.cores,
            )  # fmt: skip
            try:
                step = params.step_seconds(pt)
            except KeyError:
                step = 0.1
            # Plus the evaluation after every epoch (about a training epoch of compute).
            seconds = ARM_OVERHEAD_S[arm] + TRACE_S.get(model, 10.0) + steps * step * 1.1
            total += seconds
            print(f"  {model:9s} {hosts} hosts {rate:6g} Mbit/s {arm:12s} ~{seconds:6.0f} s")
    return total


def main(argv) -> int:
    args = parse_args(argv)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    csv_path = os.path.join(args.out, "sweep.csv")
    rows = read_rows(csv_path)
    if args.ingest:
        for path in args.ingest:
            with open(path) as f:
                new = rows_from_summary(json.load(f), None)
            have = {key(r) for r in rows}
            rows += [r for r in new if key(r) not in have]
        summary = finish(args, rows)
        print(json.dumps(summary, indent=1))
        return 0
    if args.estimate:
        total = estimate(args, rows)
        print(f"estimated wall time of the missing points: {total / 60:.0f} min")
        return 0
    if args.refit_only:
        print(json.dumps(finish(args, rows), indent=1))
        return 0
    if os.geteuid() != 0:
        print("sweep_network: needs root (the benchmark creates network namespaces); skipping.")
        return 0
    failures = 0
    start = time.monotonic()
    for model, hosts, rate in args.points:
        done = {key(r) for r in rows}
        steps = args.steps_at.get(rate, args.steps)
        missing = [a for a in args.arms if (model, hosts, rate, a, steps) not in done]
        if not missing:
            print(f"[{model} {hosts} hosts {rate:g} Mbit/s] done already", flush=True)
            continue
        name = f"{model}-h{hosts}-r{rate:g}-s{steps}"
        summary_path = os.path.join(args.out, "runs", f"{name}.json")
        cmd = [
            sys.executable, BENCH, f"--rate_mbit={rate:g}", "--delay_ms=0", f"--hosts={hosts}",
            f"--model={model}", f"--dataset={args.dataset}", f"--batch_size={args.batch_size}",
            f"--steps={steps}", f"--exchange_every={args.exchange_every}",
            f"--target_accuracy={args.target.get(model, 0.9)}", f"--arms={','.join(missing)}",
            f"--timeout={args.point_timeout}", f"--run_timeout={args.point_timeout}",
            f"--json={summary_path}",
        ]  # fmt: skip
        load = os.getloadavg()[0]
        print(f"[{name}] arms {missing}, load average {load:.2f}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.point_timeout + 120)
        if not os.path.exists(summary_path) or os.path.getmtime(summary_path) < time.time() - (
            time.monotonic() - t0
        ):
            print(f"[{name}] FAILED (exit {proc.returncode}, no summary)", flush=True)
            failures += 1
            continue
        with open(summary_path) as f:
            new = rows_from_summary(json.load(f), load)
        rows += new
        failures += proc.returncode != 0
        summary = finish(args, rows)
        print(
            f"[{name}] {len(new)} rows in {time.monotonic() - t0:.0f} s; model worst held-out error "
            f"{(summary.get('worst_held_out') or {}).get('relative_error')}",
            flush=True,
        )
    summary = finish(args, rows)
    print(json.dumps(summary, indent=1))
    print(f"sweep: {time.monotonic() - start:.0f} s, {failures} failed point(s); {csv_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
