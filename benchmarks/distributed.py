"""Data-parallel Deep RFM: the same ``agop rfm`` run on 1 and on P processes (torchrun, gloo).

Runs ``python -m torch.distributed.run --standalone --nproc-per-node P -m agop rfm ...`` for each
P, with the machine's cores split evenly between the processes (OMP_NUM_THREADS = cores / P), the
same data, solver and seed; prints the wall time of each, the speed-up over one process, and the
largest relative difference of the per-layer NC1 from the one-process run (only the order of the
sums differs, so it should be ~1e-12 in float64 and ~1e-6 in float32).

    AGOP_DATA=../shared/datasets python benchmarks/distributed.py --dataset mnist --n 20000 \\
        --centers 2000 --depth 3 --procs 1,2
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(P: int, args: argparse.Namespace, out: Path) -> float:
    cores = args.cores or os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // P)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={P}",
           "-m", "agop", "rfm", "--dataset", args.dataset, "--n-train", str(args.n),
           "--test-n", "0", "--solver", "nystrom", "--centers", str(args.centers),
           "--depth", str(args.depth), "--dtype", args.dtype, "--seed", "0", "--no-progress",
           "--out", str(out)]
    if args.agop_points:
        cmd += ["--agop-points", str(args.agop_points)]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=args.timeout)
    return time.perf_counter() - t


def nc1(path: Path) -> dict[tuple[int, str], float]:
    with open(path / "metrics.csv", newline="") as f:
        return {(int(r["layer"]), r["stage"]): float(r["nc1"]) for r in csv.DictReader(f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--centers", type=int, default=2000)
    p.add_argument("--agop-points", type=int, default=None)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--cores", type=int, default=None, help="cores to split (default: all)")
    p.add_argument("--timeout", type=int, default=3600)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times, metrics = {}, {}
        for P in [int(x) for x in args.procs.split(",")]:
            out = Path(tmp) / f"p{P}"
            times[P] = run(P, args, out)
            metrics[P] = nc1(out)
        base = min(times)
        print(f"{args.dataset}, N = {args.n:,}, M = {args.centers:,}, depth {args.depth}, "
              f"{args.dtype}, {args.cores or os.cpu_count()} cores")
        for P, t in times.items():
            diff = max(abs(metrics[P][k] / metrics[base][k] - 1) for k in metrics[base])
            print(f"P = {P}: {t:7.1f} s wall (with start-up), speed-up x{times[base] / t:.2f}, "
                  f"max rel. NC1 difference from P = {base}: {diff:.1e}")


if __name__ == "__main__":
    main()
