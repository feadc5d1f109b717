"""Benchmark the scaling policy on the shipped traces: the old ideal market beside the honest one.

    .venv/bin/python scripts/bench_simulate.py [--seeds N] [--levers break_even,prewarm] [--traces a,b]

For each trace, over N seeds (default 5; the honest market's draws and the dispatch depend on the seed),
mean ± sd of: gpuq's and the naive LOOKS baseline's $ per job, their ratio, p95 wait over jobs arriving
within the allowed hours, the p95 of jobs arriving in the first 30 minutes after the window opens, and
gpuq's cost against the in-window hindsight fleet at 85% utilisation. Then where gpuq's money goes
(busy, idle, boot, never-ready/silent, destroy lag, downloads, storage) and what each lever gives: every
lever set in `--compare-levers` is run on the honest market with the same seeds.

Goals (issue 12), on the honest market: >= 30% cheaper per job than naive with in-window p95 no worse on
steady_day, bursty_launch and quiet_night; <= 1.10x the in-window 85% hindsight fleet on steady_day.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manager.simulate import (
    DEFAULT_LEVERS,
    HONEST,
    IDEAL,
    SHIPPED,
    Market,
    SimReport,
    compare,
    hindsight_fleet_cost,
    load_trace,
)

GOAL_TRACES = ("steady_day", "bursty_launch", "quiet_night")


def ms(values: list[float], fmt: str = ".3f") -> str:
    if len(values) < 2:
        return format(values[0], fmt)
    return f"{mean(values):{fmt}}±{stdev(values):{fmt}}"


def runs(
    name: str, market: Market, levers: tuple[str, ...], seeds: int, max_instances: int = 8
) -> list[tuple[SimReport, SimReport]]:
    trace = load_trace(name)
    return [compare(trace, seed, market, levers, max_instances=max_instances) for seed in range(seeds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--traces", default=",".join(SHIPPED))
    parser.add_argument("--levers", default=",".join(DEFAULT_LEVERS), help="gpuq's levers in the main table")
    parser.add_argument(
        "--compare-levers",
        default="none;break_even;prewarm;break_even,prewarm;break_even,prewarm,cold_pool;"
        "break_even,prewarm,packing;break_even,prewarm,cold_pool,packing",
        help="lever sets to compare, ';'-separated ('none': no lever); empty: skip",
    )
    parser.add_argument(
        "--max-instances", type=int, default=8, help="gpuq's per-queue count cap (naive keeps its 4)"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.traces.split(",") if n]
    levers = tuple(x for x in args.levers.split(",") if x and x != "none")

    print(
        f"gpuq/naive $ per job and p95 wait, mean±sd over {args.seeds} seeds (levers: {','.join(levers)}; "
        f"gpuq's max instances per queue {args.max_instances})"
    )
    head = (
        f"{'trace':<14} {'ideal ratio':>12} {'honest ratio':>13} {'gpuq $/job':>14} {'naive $/job':>14} "
        f"{'p95 gpuq':>10} {'p95 naive':>10} {'1st gpuq':>10} {'1st naive':>10} {'x hind85':>10}  goals"
    )
    print(head)
    print("-" * len(head))
    honest: dict[str, list[tuple[SimReport, SimReport]]] = {}
    all_ok = True
    for name in names:
        ideal = runs(name, IDEAL, (), args.seeds)
        real = honest[name] = runs(name, HONEST, levers, args.seeds, args.max_instances)
        hind = hindsight_fleet_cost(load_trace(name), 0.85)
        ratio_i = [o.cost_per_job / n.cost_per_job for o, n in ideal]
        ratio = [o.cost_per_job / n.cost_per_job for o, n in real]
        p95_o = [o.wait_p95_in_window_s for o, _ in real]
        p95_n = [n.wait_p95_in_window_s for _, n in real]
        first_o = [o.first_open_p95_s for o, _ in real if o.first_open_p95_s is not None]
        first_n = [n.first_open_p95_s for _, n in real if n.first_open_p95_s is not None]
        vs_hind = [o.cost / hind for o, _ in real] if hind > 0 else [float("nan")]
        goals = []
        if name in GOAL_TRACES:
            goals = [("30% cheaper", mean(ratio) <= 0.70), ("p95 no worse", mean(p95_o) <= mean(p95_n))]
            if name == "steady_day":
                goals.append(("<=1.10x hindsight", mean(vs_hind) <= 1.10))
            all_ok &= all(ok for _, ok in goals)
        marks = ", ".join(f"{label} {'yes' if ok else 'NO'}" for label, ok in goals)
        per_job_o = ms([o.cost_per_job for o, _ in real], ".4f")
        per_job_n = ms([n.cost_per_job for _, n in real], ".4f")
        first = [ms(f, ".0f") if f else "n/a" for f in (first_o, first_n)]
        print(
            f"{name:<14} {ms(ratio_i, '.2f'):>12} {ms(ratio, '.2f'):>13} {per_job_o:>14} {per_job_n:>14} "
            f"{ms(p95_o, '.0f'):>10} {ms(p95_n, '.0f'):>10} {first[0]:>10} {first[1]:>10} "
            f"{ms(vs_hind, '.2f'):>10}  {marks}"
        )
    print()
    print("where gpuq's money goes on the honest market ($ per trace, mean over seeds):")
    parts = ("busy", "idle", "boot", "orphan", "lag", "download", "storage")
    print(
        f"{'trace':<14} {'total':>7} " + " ".join(f"{p:>8}" for p in parts) + f" {'rents':>6} {'never':>6}"
        f" {'hind85':>7} {'LB':>7}"
    )
    for name in names:
        real = honest[name]
        trace = load_trace(name)
        for label, pick in (("gpuq", 0), ("naive", 1)):
            rs = [r[pick] for r in real]
            costs = [mean(getattr(r, f"{p}_cost") for r in rs) for p in parts]
            print(
                f"{name + ' ' + label:<14} {mean(r.cost for r in rs):>7.2f} "
                + " ".join(f"{c:>8.2f}" for c in costs)
                + f" {mean(r.rents for r in rs):>6.1f} {mean(r.never_ready for r in rs):>6.1f}"
                + (
                    f" {hindsight_fleet_cost(trace, 0.85):>7.2f} {rs[0].lower_bound:>7.2f}"
                    if pick == 0
                    else ""
                )
            )
    if args.compare_levers:
        print()
        print(
            f"levers on the honest market (gpuq/naive $ per job, gpuq in-window p95 s; {args.seeds} seeds):"
        )
        sets = [tuple(x for x in s.split(",") if x and x != "none") for s in args.compare_levers.split(";")]
        print(f"{'levers':<38} " + " ".join(f"{n:>24}" for n in names))
        for lever_set in sets:
            cells = []
            for name in names:
                got = (
                    honest[name]
                    if lever_set == levers
                    else runs(name, HONEST, lever_set, args.seeds, args.max_instances)
                )
                ratio = [o.cost_per_job / n.cost_per_job for o, n in got]
                p95 = [o.wait_p95_in_window_s for o, _ in got]
                cells.append(f"{ms(ratio, '.3f')} p95 {mean(p95):.0f}")
            print(f"{','.join(lever_set) or 'none':<38} " + " ".join(f"{c:>24}" for c in cells))
    print()
    print("all goals met" if all_ok else "some goals not met (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
