"""Stale-weights exchange: traffic per 1,000 steps, and the step-time
overhead of refreshing peer copies through a shared directory.

    python bench/bench_weights_exchange.py [--steps=400] [--skip_overhead]

Part 1 (traffic) prints, per model, what one worker sends to the other
groups per 1,000 steps with 2 groups: the sync baseline's gradient ring
all-reduce over 2 workers, per-step prediction exchange, and weights every
K = 1, 50, 500 steps. Parameter counts are measured from the built models;
ResNet-50 is at batch 32 per worker with 1,000 classes. For cnn1d the
weights figure is also checked against the bytes a real run received.

Part 2 (overhead) runs two groups as separate processes meeting in a shared
directory, once with K = 50 and once with K = 0 (never refresh), and prints
the ratio of their training throughput (target: K = 50 at most 10% slower).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = [  # name, input shape, classes, batch per worker
    ("cnn1d", (40,), 10, 64),
    ("mlp", (40,), 10, 64),
    ("resnet20", (32, 32, 3), 10, 64),
    ("resnet50", (224, 224, 3), 1000, 32),
]


def traffic_table() -> list[str]:
    from models import build_model, count_params

    rows = [
        "| model | params | sync all-reduce | predictions every step | weights K=1 | weights K=50 | weights K=500 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, shape, classes, batch in MODELS:
        params = count_params(build_model(name, shape, classes))
        per_k = {k: 1000 / k * params * 4 for k in (1, 50, 500)}
        allreduce = 1000 * 2 * (2 - 1) / 2 * params * 4
        predictions = 1000 * batch * classes * 4
        cells = [allreduce, predictions, per_k[1], per_k[50], per_k[500]]
        rows.append(f"| {name} (batch {batch}) | {params:,} | " + " | ".join(_mb(c) for c in cells) + " |")
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def run_pair(every: int, steps: int, model: str, dataset: str, data_dir, root: str) -> list[dict]:
    procs = []
    for g in (0, 1):
        cmd = [
            sys.executable,
            "train.py",
            "--mode=codistill",
            "--exchange=weights",
            f"--exchange_every={every}",
            f"--exchange_dir={root}/exchange",
            f"--group={g}",
            "--num_groups=2",
            f"--steps={steps}",
            f"--model={model}",
            f"--dataset={dataset}",
            "--verbose=0",
            f"--workdir={root}/g{g}",
        ]
        if data_dir:
            cmd.append(f"--data_dir={data_dir}")
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    runs = []
    for g, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"group {g} (K={every}) failed:\n{out[-3000:]}")
        with open(os.path.join(root, f"g{g}", "results.json")) as f:
            runs.append(json.load(f)["runs"][0])
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--skip_overhead", action="store_true")
    args = parser.parse_args()

    print("Bytes one worker sends to the other group per 1,000 steps (2 groups):\n")
    print("\n".join(traffic_table()))
    if args.skip_overhead:
        return
    with tempfile.TemporaryDirectory() as tmp:
        refreshed = run_pair(
            50, args.steps, args.model, args.dataset, args.data_dir, os.path.join(tmp, "k50")
        )
        never = run_pair(0, args.steps, args.model, args.dataset, args.data_dir, os.path.join(tmp, "never"))
    rate = lambda runs: sum(r["examples_per_second"] for r in runs) / len(runs)  # noqa: E731
    print(f"\nRefresh overhead, {args.model} on {args.dataset}, {args.steps} steps, 2 groups as processes:")
    print(
        f"  K=50:  {rate(refreshed):,.0f} examples/s per group, "
        f"{sum(r['peer_refreshes'] for r in refreshed)} refreshes, "
        f"{sum(r['peer_refresh_seconds'] for r in refreshed):.3f} s on the training thread, "
        f"{refreshed[0]['peer_bytes_received']:,} bytes received by group 0 "
        f"(= {refreshed[0]['peer_bytes_received'] / refreshed[0]['steps'] * 1000:,.0f} per 1,000 steps)"
    )
    print(f"  never: {rate(never):,.0f} examples/s per group")
    print(f"  step-time overhead of K=50: {rate(never) / rate(refreshed) - 1:+.1%} (target <= +10%)")


if __name__ == "__main__":
    main()
