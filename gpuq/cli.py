"""The `gpuq` command: one entry point for apps' operators, the worker and the manager.

With no DATABASE_URL it starts an embedded Postgres under gpuq's data directory (gpuq.settings) and
migrates it. Errors are one line, exit codes the same in every command (gpuq.output).
"""

# PYTHON_ARGCOMPLETE_OK  (argcomplete: `eval "$(register-python-argcomplete gpuq)"` completes commands)

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import psycopg

from gpuq import __version__
from gpuq.client import FINISHED, GpuqError, Job, open_client
from gpuq.db import connect, database_url, redact
from gpuq.migrate import MigrationError, migrate
from gpuq.output import (
    FAILED,
    INTERRUPTED,
    UNREACHABLE,
    USAGE,
    CommandError,
    clean,
    fmt,
    one_line,
    print_json,
    print_table,
    progress_bar,
)
from gpuq.settings import Settings, data_dir_from_env
from manager import cli as manager_cli
from worker import cli as worker_cli

Command = Callable[[argparse.Namespace, Settings], int]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line that says where help is (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse_duration(text: str) -> float:
    """'90s', '15m', '7d', '2h' or plain seconds -> seconds (never negative)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d)") from None
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d)")
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r} (e.g. 10m from now)")
    return seconds


# Options whose value is a duration: `--delay -5m` must reach parse_duration (and its clear error), not
# be taken by argparse for an unknown option.
DURATION_OPTIONS = ("--delay", "--timeout", "--wait-timeout", "--older-than", "--valid-for", "--idle-timeout")
_NEGATIVE = re.compile(r"-\.?\d")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """`--delay -5m` -> `--delay=-5m` for the duration options (before any `--`)."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        if arg in DURATION_OPTIONS and i + 1 < len(args) and _NEGATIVE.match(args[i + 1]):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def read_payload(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read the payload file {text[1:]}: {exc.strerror or exc}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"the payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise CommandError(f"the payload must be a JSON object, got {type(payload).__name__}")
    return payload


# A column the database refuses -> the option a user gives it with.
OPTION_OF = {
    "queue": "the queue name",
    "priority": "--priority",
    "max_attempts": "--max-attempts",
    "timeout_seconds": "--timeout (in seconds)",
    "min_vram_mb": "--min-vram-mb",
    "idempotency_key": "--key",
    "payload": "the payload",
}
_CONSTRAINT = re.compile(r'violates (?:check|not-null|unique) constraint "?(\w+)"?')


def in_user_words(message: str) -> str:
    """A refusal from the database in the user's terms: a check constraint's name (which says what is
    wrong, e.g. max_attempts_must_be_between_1_and_100) as words naming the option; a function
    argument (p_older_than) without its prefix."""
    match = _CONSTRAINT.search(message) or re.fullmatch(r".*\((\w+)\)", message)
    if match and "_must_" in match[1]:  # gpuq's constraints are named as rules; others keep their message
        name = match[1]
        for column, option in OPTION_OF.items():
            if name.startswith(column + "_must_"):
                rule = name[len(column) + 1 :].replace("_", " ").replace("minus ", "-")
                return f"{option} {rule}"
        return name.replace("_", " ").replace("minus ", "-")
    return re.sub(r"\bp_(\w+)", lambda m: m[1].replace("_", " "), message)


def describe(job: Job) -> str:
    line = f"job {job.id} [{job.queue}] {job.status}"
    if job.status == "running" and job.progress is not None:
        line += f" {job.progress}%"
    if job.progress_message and job.status == "running":
        line += f" {job.progress_message}"
    if job.error_code:
        line += f" {job.error_code}: {job.error_message}"
    return clean(line)


def job_json(job: Job) -> dict[str, Any]:
    """A job as `show` and `--json` print it: every column but the lease token (the running worker's, not
    for scripts or screens)."""
    return {k: v for k, v in job.__dict__.items() if k != "lease_token"}


def data_dir_line(settings: Settings) -> str:
    return f"data directory {settings.data_dir} ({settings.data_dir_source})"


# --- commands -------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    print(data_dir_line(settings))
    url = database_url(settings)
    with connect(url, settings) as conn:
        applied = migrate(conn)
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    print(f"{redact(url)} is up to date")
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    payload = read_payload(args.payload)  # before connecting: a bad payload costs nothing
    with open_client(settings) as client:
        job_id = client.enqueue(
            args.queue,
            payload,
            priority=args.priority,
            run_after=datetime.now().astimezone() + timedelta(seconds=args.delay) if args.delay else None,
            max_attempts=args.max_attempts,
            timeout_seconds=int(args.timeout),
            min_vram_mb=args.min_vram_mb,
            idempotency_key=args.key,
        )
        print(job_id, flush=True)
        if not args.wait:
            return 0
        with progress_bar(f"job {job_id}", 100) as bar:

            def on_progress(job: Job) -> None:
                bar.update(job.progress or (100 if job.status == "succeeded" else 0), describe(job))
                bar.print(describe(job))

            try:
                job = client.wait(job_id, timeout=args.wait_timeout, on_progress=on_progress)
            except TimeoutError:
                now = client.get(job_id).status
                raise CommandError(
                    f"job {job_id} is still {now} after --wait-timeout {args.wait_timeout:g} s; it goes on "
                    f"(`gpuq show {job_id}`, `gpuq cancel {job_id}`)",
                    FAILED,
                ) from None
        if job.result:
            print(json.dumps(job.result, indent=2))
        return 0 if job.status == "succeeded" else FAILED


HISTORY_COLUMNS = [
    "attempt",
    "event",
    "at",
    "instance_id",
    "gpu_name",
    "run_seconds",
    "cost_usd",
    "error_code",
    "message",
]


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        job = client.get(args.job_id)
        history = client.history(args.job_id)
    if args.json:
        print_json({**job_json(job), "history": history})
        return 0
    for key, value in job_json(job).items():
        print(f"{key:20} {fmt(value)}")
    print("\nhistory:")
    print_table(history, HISTORY_COLUMNS)
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise CommandError(f"--limit must be at least 1, got {args.limit}")
    with open_client(settings) as client:
        jobs = client.list_jobs(queue=args.queue, status=args.status, limit=args.limit)
    if args.json:
        print_json([job_json(j) for j in jobs])
        return 0
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
        before = client.get(args.job_id).status
        if before in FINISHED:
            raise CommandError(f"job {args.job_id} already {before}; nothing to cancel", FAILED)
        status = client.cancel(args.job_id)
    print(
        f"job {args.job_id}: " + ("cancellation requested from its worker" if status == "running" else status)
    )
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        client.retry(args.job_id)
        print(f"job {args.job_id}: queued again")
    return 0


def check_time_zone(name: str) -> str:
    """An IANA time zone name, checked here so a typo is one line, not the database's error."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown time zone {name!r} (use an IANA name such as UTC or Europe/Madrid)"
        ) from None
    return name


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    with open_client(settings) as client:
        stats = {
            "queues": client.queue_stats(),
            "instances": client.instance_stats(args.tz),
            "failures": client.failure_stats(),
        }
    if args.json:
        print_json(stats)
        return 0
    print("queues  (select * from gpuq.queue_stats())")
    print_table(stats["queues"])
    print("\ninstances  (select * from gpuq.instance_stats())")
    print_table(stats["instances"])
    print("\nfailures, last 24 h  (select * from gpuq.failure_stats())")
    print_table(stats["failures"])
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
            raise CommandError(
                "this database login may not enroll instances (it needs gpuq_manager)"
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
            raise CommandError(
                "this database login may not revoke instances (it needs gpuq_manager)"
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

    print(data_dir_line(settings), flush=True)
    return run_demo(settings, jobs=args.jobs, idle_timeout_s=args.idle_timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpuq",
        description="GPU inference jobs as rows in Postgres. With no DATABASE_URL, an embedded Postgres "
        "under the data directory (GPUQ_DATA_DIR, else ./.gpuq if present, else ~/.local/share/gpuq) is "
        "started and used. Exit codes: 0 done, 1 the job or goal did not succeed, 2 bad usage or input, "
        "3 cannot reach what it needs, 130 interrupted.",
    )
    parser.add_argument(
        "--version", action=VersionAction, help="print the version, the data directory and the database"
    )
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
    p.add_argument("--json", action="store_true", help="the job and its history as JSON")

    p = command("list", cmd_list, "list recent jobs, newest first")
    p.add_argument("--queue", help="only this queue's jobs")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20)")
    p.add_argument("--json", action="store_true", help="a JSON list of jobs")

    p = command("cancel", cmd_cancel, "cancel a job (a running one is stopped by its worker)")
    p.add_argument("job_id", type=int)

    p = command("retry", cmd_retry, "queue a failed or cancelled job again")
    p.add_argument("job_id", type=int)

    p = command("stats", cmd_stats, "queue, instance and failure statistics")
    p.add_argument(
        "--tz", type=check_time_zone, default="UTC", help="time zone of 'today' for spend (default UTC)"
    )
    p.add_argument("--json", action="store_true", help="the three tables as JSON")

    p = command("prune", cmd_prune, "delete finished jobs and their history older than a duration")
    p.add_argument(
        "--older-than", type=parse_duration, default=7 * 86400.0, help="finished this long ago (default 7d)"
    )

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


class VersionAction(argparse.Action):
    """`gpuq --version`: the version, and which data directory and database a command here would use."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        from dotenv import load_dotenv

        from gpuq.settings import env_str

        load_dotenv(override=False)
        data_dir, source = data_dir_from_env()
        url = env_str("DATABASE_URL", "")
        print(f"gpuq {__version__}")
        print(f"data directory {data_dir} ({source})")
        print(f"database {redact(url)}" if url else f"database embedded Postgres under {data_dir / 'pgdata'}")
        parser.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _completion(parser)
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the embedded server's start/stop chatter is not for users
        logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        settings = Settings.from_env()
        if settings.data_dir_source.startswith("./"):
            print(
                f"gpuq: using {settings.data_dir} ({settings.data_dir_source}); set GPUQ_DATA_DIR to choose",
                file=sys.stderr,
            )
        return int(args.func(args, settings))
    except CommandError as exc:
        return _fail(str(exc), exc.code)
    except (GpuqError, MigrationError) as exc:
        return _fail(in_user_words(str(exc)), USAGE)
    except psycopg.OperationalError as exc:
        return _fail(f"cannot reach the database: {one_line(exc)}", UNREACHABLE)
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.DataError) as exc:
        return _fail(one_line(exc), USAGE)
    except FileNotFoundError as exc:
        return _fail(f"no such file: {exc.filename}", USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", INTERRUPTED)
    except BrokenPipeError:  # `gpuq list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except SystemExit as exc:  # a setting's own message (gpuq.settings, manager.config): bad input
        if isinstance(exc.code, str):
            return _fail(exc.code, USAGE)
        raise


def _fail(message: str, code: int) -> int:
    line = one_line(message)
    print(line if line.startswith("gpuq") else f"gpuq: {line}", file=sys.stderr)
    return code


def _completion(parser: argparse.ArgumentParser) -> None:
    """Shell completion, when the shell asks (argcomplete sets _ARGCOMPLETE); nothing otherwise."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


if __name__ == "__main__":
    sys.exit(main())
