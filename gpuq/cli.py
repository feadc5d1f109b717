"""The `gpuq` command: one entry point for apps' operators, the worker and the manager.

With no DATABASE_URL it starts an embedded Postgres under GPUQ_DATA_DIR (default ./.gpuq) and migrates it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from gpuq import __version__
from gpuq.client import GpuqError, Job, open_client
from gpuq.db import connect, database_url, redact
from gpuq.migrate import MigrationError, migrate
from gpuq.settings import Settings
from manager import cli as manager_cli
from worker import cli as worker_cli

Command = Callable[[argparse.Namespace, Settings], int]


def parse_duration(text: str) -> float:
    """'90s', '15m', '7d', '2h' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d)") from None


def read_payload(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"gpuq: the payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise SystemExit(f"gpuq: the payload must be a JSON object, got {type(payload).__name__}")
    return payload


# Terminal control characters (C0, DEL, C1) and the bidirectional overrides that reorder what is shown:
# stored text (a worker's error or progress message) must not move the cursor, retitle the terminal or
# hide what follows when printed. They are shown escaped instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """`text` fit for a terminal: each control character shown as its escape (\\x1b, \\n, \\u202e)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.3f}s"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return clean(str(value))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def describe(job: Job) -> str:
    line = f"job {job.id} [{job.queue}] {job.status}"
    if job.status == "running" and job.progress is not None:
        line += f" {job.progress}%"
    if job.progress_message and job.status == "running":
        line += f" {job.progress_message}"
    if job.error_code:
        line += f" {job.error_code}: {job.error_message}"
    return clean(line)


# --- commands -------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    url = database_url(settings)
    with connect(url, settings) as conn:
        applied = migrate(conn)
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    print(f"{redact(url)} is up to date")
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        job_id = client.enqueue(
            args.queue,
            read_payload(args.payload),
            priority=args.priority,
            run_after=datetime.now().astimezone() + timedelta(seconds=args.delay) if args.delay else None,
            max_attempts=args.max_attempts,
            timeout_seconds=int(args.timeout),
            min_vram_mb=args.min_vram_mb,
            idempotency_key=args.key,
        )
        print(job_id)
        if not args.wait:
            return 0
        job = client.wait(
            job_id, timeout=args.wait_timeout, on_progress=lambda j: print(describe(j), flush=True)
        )
        if job.result:
            print(json.dumps(job.result, indent=2))
        return 0 if job.status == "succeeded" else 1


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        job = client.get(args.job_id)
        for key, value in job.__dict__.items():
            print(f"{key:20} {fmt(value)}")
        print("\nhistory:")
        print_table(
            client.history(args.job_id),
            [
                "attempt",
                "event",
                "at",
                "instance_id",
                "gpu_name",
                "run_seconds",
                "cost_usd",
                "error_code",
                "message",
            ],
        )
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        jobs = client.list_jobs(queue=args.queue, status=args.status, limit=args.limit)
        print_table(
            [j.__dict__ for j in jobs],
            [
                "id",
                "queue",
                "status",
                "priority",
                "attempt",
                "progress",
                "created_at",
                "finished_at",
                "error_code",
            ],
        )
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        status = client.cancel(args.job_id)
        print(
            f"job {args.job_id}: "
            + ("cancellation requested from its worker" if status == "running" else status)
        )
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        client.retry(args.job_id)
        print(f"job {args.job_id}: queued again")
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        print("queues  (select * from gpuq.queue_stats())")
        print_table(client.queue_stats())
        print("\ninstances  (select * from gpuq.instance_stats())")
        print_table(client.instance_stats(args.tz))
        print("\nfailures, last 24 h  (select * from gpuq.failure_stats())")
        print_table(client.failure_stats())
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        print(f"deleted {client.prune(args.older_than)} finished jobs")
    return 0


def cmd_enroll(args: argparse.Namespace, settings: Settings) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    with open_client(settings) as client:
        try:
            instance_id, secret = client.enroll(
                queues,
                max_concurrency=args.concurrency,
                vram_mb=args.vram_mb,
                gpu_name=args.gpu_name,
                valid_for_seconds=args.valid_for,
            )
        except psycopg.errors.InsufficientPrivilege:
            raise SystemExit(
                "gpuq: this database login may not enroll instances (it needs gpuq_manager)"
            ) from None
    print(
        f"instance {instance_id} serves {', '.join(queues)} ({args.concurrency} job(s) at once, "
        f"{args.vram_mb} MB of VRAM)"
        + (f", valid for {args.valid_for:g} s" if args.valid_for else "")
        + ". Start its worker with this secret in its environment (shown once; gpuq keeps only its hash;"
        " `gpuq revoke ID` ends it):",
        file=sys.stderr,
    )
    print(f"GPUQ_INSTANCE_SECRET={secret}")
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        try:
            n = int(
                client.call("select gpuq.revoke_instance(%s, %s) as n", (args.instance_id, args.reason))[0][
                    "n"
                ]
            )
        except psycopg.errors.InsufficientPrivilege:
            raise SystemExit(
                "gpuq: this database login may not revoke instances (it needs gpuq_manager)"
            ) from None
    print(f"instance {args.instance_id}: revoked; {n} job(s) back in the queue")
    return 0


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from gpuq.dashboard.board import Budget  # the web stack: only the dashboard needs it
    from gpuq.dashboard.server import DashboardSettings, serve
    from manager.config import ManagerSettings

    budget = Budget.of(ManagerSettings.from_env().policy)  # the caps the page holds spend against
    with open_client(settings) as client:  # migrates the embedded default; checks a real database
        url = client.url
    return serve(url, settings, budget, DashboardSettings.from_env(host=args.host, port=args.port))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from manager.demo import run_demo  # Pillow and the providers: only the demo needs them here

    return run_demo(settings, jobs=args.jobs, idle_timeout_s=args.idle_timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuq",
        description="GPU inference jobs as rows in Postgres. With no DATABASE_URL, an embedded Postgres "
        "under GPUQ_DATA_DIR (./.gpuq) is started and used.",
    )
    parser.add_argument("--version", action="version", version=f"gpuq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    command("migrate", cmd_migrate, "create or update gpuq's schema (safe to run again, and concurrently)")

    p = command("submit", cmd_submit, "enqueue a job and print its id")
    p.add_argument("queue", help="queue name, e.g. tts or images")
    p.add_argument("payload", nargs="?", help="JSON object, @file.json, or - for stdin (default {})")
    p.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first (default 0)")
    p.add_argument(
        "--delay", type=parse_duration, default=0, help="run no sooner than this from now, e.g. 10m"
    )
    p.add_argument("--max-attempts", type=int, default=3, help="attempts before it fails (default 3)")
    p.add_argument(
        "--timeout", type=parse_duration, default=3600.0, help="per-attempt time limit (default 1h)"
    )
    p.add_argument("--min-vram-mb", type=int, default=0, help="only workers with this much GPU memory")
    p.add_argument("--key", help="idempotency key: no second live job with the same key")
    p.add_argument(
        "--wait", action="store_true", help="show progress until the job ends; exit 1 unless it succeeded"
    )
    p.add_argument(
        "--wait-timeout", type=parse_duration, default=None, help="give up waiting after this long"
    )

    p = command("show", cmd_show, "show a job, its result and its history (attempts, instances, cost)")
    p.add_argument("job_id", type=int)

    p = command("list", cmd_list, "list recent jobs")
    p.add_argument("--queue")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20)

    p = command("cancel", cmd_cancel, "cancel a job (a running one is stopped by its worker)")
    p.add_argument("job_id", type=int)

    p = command("retry", cmd_retry, "queue a failed or cancelled job again")
    p.add_argument("job_id", type=int)

    p = command("stats", cmd_stats, "queue, instance and failure statistics")
    p.add_argument("--tz", default="UTC", help="time zone of 'today' for spend (default UTC)")

    p = command("prune", cmd_prune, "delete finished jobs and their history older than a duration")
    p.add_argument("--older-than", type=parse_duration, default=7 * 86400.0, help="default 7d")

    p = command(
        "enroll",
        cmd_enroll,
        "make an instance for a worker started by hand, and print the secret its worker needs",
    )
    p.add_argument("--queues", required=True, help="queues the instance serves, comma-separated")
    p.add_argument("--concurrency", type=int, default=1, help="jobs it runs at once (default 1)")
    p.add_argument("--vram-mb", type=int, default=0, help="its GPU memory: jobs needing more are not its")
    p.add_argument("--gpu-name", help="its GPU, for the books")
    p.add_argument(
        "--valid-for", type=parse_duration, default=None, help="the secret expires after this, e.g. 30d"
    )

    p = command("revoke", cmd_revoke, "end an instance: its secret stops working, its jobs go back")
    p.add_argument("instance_id", type=int)
    p.add_argument("--reason", default="revoked by an operator")

    p = command("worker", worker_cli.run, "run a worker: claim jobs, run their backends, store outputs")
    worker_cli.add_arguments(p)

    p = command("manager", manager_cli.run, "rent and destroy instances: tick, run, status, simulate")
    manager_cli.add_arguments(p)

    p = command(
        "dashboard", cmd_dashboard, "serve the operators' live page: queues, fleet, jobs, money, controls"
    )
    p.add_argument("--host", help="interface to serve on (GPUQ_DASHBOARD_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GPUQ_DASHBOARD_PORT, default 8090)")

    p = command(
        "demo", cmd_demo, "the whole thing on this machine: enqueue, workers start, outputs, workers stop"
    )
    p.add_argument("--jobs", type=int, default=6, help="jobs to enqueue (default 6)")
    p.add_argument("--idle-timeout", type=parse_duration, default=10.0, help="stop idle workers after (10s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the embedded server's start/stop chatter is not for users
        logging.getLogger("pgserver").setLevel(logging.WARNING)
    settings = Settings.from_env()
    try:
        return int(args.func(args, settings))
    except (GpuqError, MigrationError) as exc:
        print(f"gpuq: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"gpuq: cannot reach the database: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
