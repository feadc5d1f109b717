"""Benchmark the scaling policy on the shipped traces against the naive LOOKS baseline and a lower bound.

    .venv/bin/python scripts/bench_simulate.py [--seeds N]

For each trace: cost per job and p95 wait of gpuq's policy, of the naive baseline (fixed 30-minute idle,
at most 4 GPUs, cheapest offer per hour) and the lower bound (every job's work at the cheapest price per
unit of work, no idle, no boot). Goals (the manager issue): at least 30% cheaper per job than the baseline
with no worse p95 wait, and within 15% of the lower bound on the steady trace. Dispatch is random (workers
race for jobs), so each figure is the mean over N seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manager.simulate import SHIPPED, compare, format_table, hindsight_fleet_cost, load_trace, lower_bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)

    print(format_table([compare(load_trace(name)) for name in SHIPPED]))
    print()
    print(f"over {args.seeds} dispatch seeds:")
    header = (
        f"{'trace':<14} {'gpuq $/job':>10} {'naive $/job':>11} {'LB $/job':>9} {'gpuq/naive':>10} "
        f"{'gpuq/LB':>8} {'p95 gpuq':>9} {'p95 naive':>9}  goals"
    )
    print(header)
    print("-" * len(header))
    all_ok = True
    for name in SHIPPED:
        trace = load_trace(name)
        runs = [compare(trace, seed) for seed in range(args.seeds)]
        ours = mean(o.cost_per_job for o, _ in runs)
        naive = mean(n.cost_per_job for _, n in runs)
        lb = runs[0][0].lower_bound_per_job
        p95_ours = mean(o.wait_p95_s for o, _ in runs)
        p95_naive = mean(n.wait_p95_s for _, n in runs)
        goals = [
            ("30% cheaper", ours <= 0.70 * naive),
            ("p95 no worse", p95_ours <= p95_naive),
        ]
        if name == "steady_day":
            goals.append(("within 15% of LB", ours <= 1.15 * lb))
        all_ok &= all(ok for _, ok in goals)
        marks = ", ".join(f"{label} {'yes' if ok else 'NO'}" for label, ok in goals)
        print(
            f"{name:<14} {ours:>10.4f} {naive:>11.4f} {lb:>9.4f} {ours / naive:>10.2f} "
            f"{ours / lb:>8.2f} {p95_ours:>9.0f} {p95_naive:>9.0f}  {marks}"
        )
    print()
    print(
        "a fleet of whole GPUs sized with hindsight to each hour's load (no boots, no outbids, no queueing):"
    )
    for name in SHIPPED:
        trace = load_trace(name)
        lb = lower_bound(trace)
        costs = {u: hindsight_fleet_cost(trace, u) for u in (1.0, 0.85)}
        figures = ", ".join(f"at {u:.0%} utilisation ${c:.2f} ({c / lb:.2f}x LB)" for u, c in costs.items())
        print(f"  {name:<14} {figures}")
    print()
    print("all goals met" if all_ok else "some goals not met (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
