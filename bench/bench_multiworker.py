"""Throughput of codistillation (2 groups x 2 workers, per-step prediction
exchange) against sync training (1 group x 4 workers, gradient all-reduce),
4 processes on this machine, same model and global batch, from one run.

    python bench/bench_multiworker.py [--model=cnn1d] [--steps=300] [--batch_size=128]

Prints steps per second of each arm, their ratio, and the bytes each worker
hands to collectives per step (in-group all-reduce and cross-group exchange).
Both arms run in this invocation, one after the other, so the ratio is
comparable even on a noisy machine; absolute numbers are not.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(arm: str, np_: int, groups: int, args, workdir: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tf_codistill.launch",
        "--np",
        str(np_),
        "--groups",
        str(groups),
        "--",
        "train.py",
        f"--mode={arm}",
        f"--model={args.model}",
        f"--dataset={args.dataset}",
        f"--batch_size={args.batch_size}",
        f"--steps={args.steps}",
        "--verbose=0",
        f"--steps_per_execution={args.steps_per_execution}",
        f"--workdir={workdir}",
    ]
    if args.data_dir:
        cmd.append(f"--data_dir={args.data_dir}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"{arm} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["runs"][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--steps_per_execution", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sync = run("sync", 4, 1, args, os.path.join(tmp, "sync"))
        codistill = run("codistill", 4, 2, args, os.path.join(tmp, "codistill"))
    print(
        f"model={args.model} dataset={args.dataset} global batch={args.batch_size} "
        f"steps={args.steps} steps_per_execution={args.steps_per_execution} processes=4 (this machine)"
    )
    print(
        f"{'arm':28s} {'steps/s':>8s} {'bytes/step in group':>20s} {'bytes/step across':>18s} {'total':>10s}"
    )
    for name, r in (("sync 1 x 4 (all-reduce)", sync), ("codistill 2 x 2 (predictions)", codistill)):
        rate = r["examples_per_second"] / args.batch_size
        print(
            f"{name:28s} {rate:8.2f} {r['bytes_in_group_per_step']:20,.0f} "
            f"{r['bytes_cross_group_per_step']:18,.0f} {r['bytes_sent_per_step']:10,.0f}"
        )
    ratio = codistill["examples_per_second"] / sync["examples_per_second"]
    print(f"throughput ratio codistill / sync: {ratio:.3f}")
    print(
        f"bytes per step ratio codistill / sync: {codistill['bytes_sent_per_step'] / sync['bytes_sent_per_step']:.3f}"
    )


if __name__ == "__main__":
    main()
