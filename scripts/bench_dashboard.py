"""What the dashboard's reads cost on a big history: 10^6 finished jobs (by default spread over 30 days),
a live queue, and a fleet's worth of instances, in a scratch database on the server at GPUQ_TEST_ADMIN_URL.

    .venv/bin/python scripts/bench_dashboard.py [--jobs 1000000] [--days 30] [--plans]

Prints, per function the page calls, the median time of 5 calls and (--plans) each inner statement's plan
with its scans, from auto_explain (the functions are not inlined, so a plain EXPLAIN shows a Function Scan
only). Needs a superuser at that URL (LOAD auto_explain; the rows are written with triggers off).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpuq.migrate import migrate

ADMIN_URL = os.environ.get("GPUQ_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

CALLS = [
    "select * from gpuq.dashboard_queues()",
    "select * from gpuq.dashboard_queue_outcomes()",
    "select * from gpuq.dashboard_instances()",
    "select * from gpuq.dashboard_jobs(50)",
    "select * from gpuq.dashboard_money('UTC')",
    "select * from gpuq.dashboard_failures(interval '24 hours')",
    "select * from gpuq.dashboard_decisions(30)",
    "select * from gpuq.dashboard_actions(20)",
    "select * from gpuq.dashboard_queue_depth('24 hours', '15 minutes')",
    "select * from gpuq.dashboard_fleet_history('24 hours', '15 minutes')",
]

FILL = """
set session_replication_role = replica;  -- a scratch database: no insert guard, no NOTIFY per row
insert into gpuq.jobs (queue, payload, status, attempt, created_at, run_after, started_at, finished_at,
                       error_code, error_message, progress)
select 'q' || (n % 5), '{}',
       (case when n % 100 < 3 then 'failed' when n % 100 = 3 then 'cancelled' else 'succeeded' end)
           ::gpuq.job_status,
       1, t, t, t + interval '20 seconds', t + interval '80 seconds',
       case when n % 100 < 3 then 'GPU_OOM' when n % 100 = 3 then 'CANCELLED' end,
       case when n % 100 < 3 then 'CUDA out of memory' end, 100
  from (select n, now() - make_interval(secs => random() * %(days)s * 86400 + 120) as t
          from generate_series(1, %(jobs)s) as n) as x;
insert into gpuq.job_events (job_id, attempt, event, at, started_at, error_code, message)
select id, 1, 'failed', finished_at, started_at, 'GPU_OOM', 'CUDA out of memory'
  from gpuq.jobs where status = 'failed';
insert into gpuq.job_events (job_id, attempt, event, at, started_at, error_code, message)
select id, 1, 'retry_scheduled', started_at + interval '10 seconds', started_at, 'BACKEND_UNAVAILABLE', 'down'
  from gpuq.jobs where status = 'succeeded' and id % 50 = 0;
insert into gpuq.instances (provider, provider_instance_id, label, status, gpu_name, dph, queues, created_at,
                            ready_at, terminated_at)
select 'vast', 'p' || n, 'gpuq:default:q' || (n % 5),
       case when n <= 20 then 'busy' else 'terminated' end::gpuq.instance_status, 'RTX 4090', 0.35,
       array['q' || (n % 5)], t, t + interval '10 minutes', case when n > 20 then t + interval '3 hours' end
  from (select n, now() - make_interval(secs => case when n <= 20 then 3600
                                                     else random() * %(days)s * 86400 end) as t
          from generate_series(1, 2000) as n) as x;
insert into gpuq.instance_events (instance_id, at, event, status, dph, message)
select id, created_at, 'rented', 'requested', dph, 'rent offer for queue ' || queues[1] from gpuq.instances;
insert into gpuq.instance_events (instance_id, at, event, status, dph, message)
select id, terminated_at, 'destroyed', 'terminated', dph, 'destroy: idle 10 min'
  from gpuq.instances where terminated_at is not null;
insert into gpuq.jobs (queue, payload, created_at, run_after)
select 'q' || (n % 5), '{}', now() - make_interval(secs => n), now() - make_interval(secs => n)
  from generate_series(1, 2000) as n;
insert into gpuq.jobs (queue, payload, status, attempt, created_at, run_after, started_at, instance_id,
                       lease_expires_at, lease_token, progress)
select 'q' || (n % 5), '{}', 'running', 1, now() - interval '5 minutes', now() - interval '5 minutes',
       now() - interval '1 minute', 1 + n % 20, now() + interval '1 minute', gen_random_uuid(), n % 100
  from generate_series(1, 50) as n;
set session_replication_role = origin;
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="finished jobs (default 10^6)")
    parser.add_argument("--days", type=float, default=30.0, help="spread over this many days (default 30)")
    parser.add_argument("--plans", action="store_true", help="print each inner statement's plan")
    args = parser.parse_args()

    name = f"gpuq_bench_dashboard_{os.getpid()}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    url = make_conninfo(ADMIN_URL, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create schema gpuq")
            from psycopg.rows import dict_row

            conn.row_factory = dict_row  # type: ignore[assignment]
            migrate(conn)  # type: ignore[arg-type]
            started = time.monotonic()
            conn.execute(FILL.replace("%(jobs)s", str(args.jobs)).replace("%(days)s", str(args.days)))
            conn.execute("vacuum analyze")
            counts = conn.execute(
                "select count(*) as jobs, (select count(*) from gpuq.job_events) as events,"
                " count(*) filter (where finished_at > now() - interval '24 hours') as day from gpuq.jobs"
            ).fetchone()
            print(
                f"{counts['jobs']:,} jobs ({counts['day']:,} finished in the last 24 h), "
                f"{counts['events']:,} events, 2,000 instances; filled in {time.monotonic() - started:.0f} s",
                end="\n\n",
            )
            for sql in CALLS:
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    conn.execute(sql).fetchall()
                    times.append((time.perf_counter() - t0) * 1000)
                print(f"{statistics.median(times):8.1f} ms  {sql}")
            if args.plans:
                print_plans(conn)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')
    return 0


def print_plans(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    plans: list[str] = []
    conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    conn.execute("load 'auto_explain'")
    for setting in (
        "log_min_duration = 0",
        "log_nested_statements = on",
        "log_analyze = on",
        "log_buffers = on",
    ):
        conn.execute(f"set auto_explain.{setting}")
    conn.execute("set client_min_messages = log")
    for sql in CALLS:
        plans.clear()
        conn.execute(sql).fetchall()
        print(f"\n=== {sql}")
        for plan in plans[:-1]:  # the last is the outer call's Function Scan
            for line in plan.splitlines():
                if re.search(r"Scan|Execution Time|Query Text|Sort Method|Rows Removed", line):
                    print("   ", line.strip()[:150])


if __name__ == "__main__":
    sys.exit(main())
