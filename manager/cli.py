"""`gpuq manager …`: tick (one pass, for cron), run (a loop), status, simulate; --dry-run plans only.

gpuq/cli.py mounts this with add_arguments(parser) and run(args, settings); main() runs it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import psycopg

from gpuq.client import Client, open_client
from gpuq.db import set_deadline
from gpuq.output import FAILED, UNREACHABLE, CommandError, one_line, print_json, print_table
from gpuq.settings import Settings
from manager import simulate
from manager.config import ManagerSettings
from manager.metrics import Metrics
from manager.preflight import check_before_renting
from manager.providers import REGISTRY
from manager.providers.base import Provider
from manager.state import idle_by_reason, idle_hours, status_lines
from manager.tick import Manager, tick

log = logging.getLogger("gpuq.manager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="manager_command", required=True, metavar="SUBCOMMAND")

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=description)

    p = command(
        "tick",
        "one pass: reconcile, decide, act (for cron)",
        "One pass of the manager, for cron (e.g. every minute): compare the providers' instances with the "
        "database, decide from queue depth, idle time, caps and hours what to rent and destroy, and do it. "
        "On the embedded default the local workers it starts keep the embedded Postgres running until they "
        "end. Exits 1 if an action failed or a destroy was not confirmed.",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what it would do; create, destroy, write nothing"
    )
    p = command(
        "run",
        "tick every GPUQ_MANAGER_TICK_SECONDS until stopped",
        "The manager as a service: a tick every GPUQ_MANAGER_TICK_SECONDS (default 60) until SIGTERM or "
        "Ctrl-C, waiting out database outages. When it ends, the local worker processes it started end "
        "too; rented machines are left to the next manager.",
    )
    p.add_argument("--dry-run", action="store_true", help="plan every tick, act on none")
    p.add_argument("--ticks", type=int, default=0, help="stop after this many ticks (default: never)")
    p = command(
        "status",
        "instances, spend per day and per instance",
        "The instances the manager runs now, the money caps, and spend: today, per day, per instance.",
    )
    p.add_argument("--days", type=int, default=7, help="days of spend to show (default 7)")
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p = sub.add_parser("simulate", help="replay workload traces through the policy (see manager/simulate.py)")
    simulate.add_arguments(p)


def build_providers(ms: ManagerSettings, db_url: str, settings: Settings) -> dict[str, Provider]:
    providers = {}
    for name in ms.providers:
        factory = REGISTRY.get(name)
        if factory is None:
            raise CommandError(f"unknown provider {name!r} (known: {', '.join(sorted(REGISTRY))})")
        providers[name] = factory(ms, db_url, settings.data_dir, embedded=settings.database_url is None)
    return providers


def run(args: argparse.Namespace, settings: Settings) -> int:
    command = args.manager_command
    if command == "simulate":
        options = [t for t in getattr(args, "traces", None) or [] if t.startswith("-")]
        if options:
            raise CommandError(
                f"{options[0]} came after `--`, so it was read as a trace name; "
                f"put options before `--` (e.g. gpuq manager simulate {options[0]})"
            )
        return simulate.run(args)
    ms = ManagerSettings.from_env()
    stop = _stop_on_signals() if command == "run" else None
    client = _open(settings, ms, stop)
    if client is None:
        return 0  # stopped before the database ever answered
    manager: Manager | None = None
    try:
        if command == "status":
            return _status(client, ms, args.days, as_json=args.json)
        check_before_renting(ms, client)  # what rented hosts would get: their own login, no secret
        manager = Manager(client, ms, build_providers(ms, client.url, settings), Metrics())
        if command == "tick":
            result = tick(manager, dry_run=args.dry_run)
            return FAILED if result.errors or result.reconcile.unverified else 0
        from gpuq.dashboard.server import start_beside_manager  # serves when GPUQ_DASHBOARD_PORT is set

        start_beside_manager(client.url, settings, ms.policy)
        try:
            return _loop(manager, args.dry_run, args.ticks, stop)
        finally:
            if not args.dry_run:  # a dry run acts on nothing, its end included
                _stop_local_workers(manager)
    finally:
        (manager.client if manager is not None else client).close()  # run may have reconnected


def _stop_local_workers(manager: Manager) -> None:
    """`run` ends: the worker processes it started on this machine end with it (each drains and hands its
    jobs back), recorded as destroyed. Nothing would stop them once idle, and on the embedded default
    they would keep its Postgres running for ever. Rented machines are left to the next manager."""
    local = manager.providers.get("local")
    if local is None:
        return
    prefix = manager.settings.label_prefix
    try:
        rows = manager.client.call("select id, provider, provider_instance_id from gpuq.manager_instances()")
    except psycopg.Error as e:
        log.warning("cannot read the instances (%s); stopping the local workers unrecorded", e)
        rows = []
    recorded = {r["provider_instance_id"]: int(r["id"]) for r in rows if r["provider"] == "local"}
    for worker in local.list_instances(prefix):
        log.info("run ends: stopping local worker %s", worker.provider_id)
        local.destroy(worker.provider_id)
        instance_id = recorded.get(worker.provider_id)
        if instance_id is not None:
            with contextlib.suppress(psycopg.Error):
                manager.client.call(
                    "select gpuq.record_destroy(%s, %s, true)", (instance_id, "gpuq manager run ended")
                )


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping after this tick", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _open(settings: Settings, ms: ManagerSettings, stop: threading.Event | None) -> Client | None:
    """The manager's database client, every statement held to the deadline. `run` (given `stop`) waits
    for a database that does not answer yet, as it does mid-run; `tick` and `status` fail at once."""
    delay = 1.0
    while True:
        try:
            client = open_client(settings)
            try:
                set_deadline(client.conn, ms.db_timeout_s, settings)
            except BaseException:
                client.close()
                raise
            return client
        except psycopg.OperationalError as e:
            why = one_line(e) or type(e).__name__
            if stop is None:
                raise CommandError(f"cannot reach the database: {why}", UNREACHABLE) from None
            log.warning("database unreachable (%s); trying again in %.0f s", why, delay)
        if stop.wait(delay):
            return None
        delay = min(delay * 2, max(ms.tick_seconds, 1.0))


def _loop(manager: Manager, dry_run: bool, ticks: int, stop: threading.Event | None = None) -> int:
    stop = stop if stop is not None else _stop_on_signals()
    server = None
    if manager.settings.metrics_port:
        server = manager.metrics.serve(manager.settings.metrics_port)
    done = 0
    try:
        while not stop.is_set():
            # A connection that went stale in an outage is replaced before the tick, not by a failed tick.
            if _database_ready(manager):
                try:
                    tick(manager, dry_run=dry_run)
                except Exception:  # a loop that dies leaves machines billing: log, wait, go on
                    log.exception("tick failed; trying again next interval")
                    _reconnect(manager)
            done += 1
            if ticks and done >= ticks:
                break
            stop.wait(manager.settings.tick_seconds)
    finally:
        if server is not None:
            server.shutdown()
    return 0


def _database_ready(manager: Manager) -> bool:
    """Whether the database answers now, on a new connection if the old one is gone or silent."""
    conn = manager.client.conn
    if not (conn.closed or conn.broken):
        try:
            conn.execute("select 1")
            return True
        except psycopg.Error as e:
            log.warning("database check failed (%s); reconnecting", str(e).strip().splitlines()[0])
    return _reconnect(manager, force=True)


def _reconnect(manager: Manager, *, force: bool = False) -> bool:
    """A new database connection when the old one is gone (a restart, a failover, a network blip):
    without it every later tick failed on the dead connection and nothing was destroyed again. `force`:
    also when psycopg does not know it is gone yet (a check failed on it)."""
    old = manager.client
    if not force and not (old.conn.closed or old.conn.broken):
        return True
    try:
        client = Client.connect(old.url, old.settings)
        set_deadline(client.conn, manager.settings.db_timeout_s, old.settings)
    except Exception as e:
        log.warning("database reconnect failed (%s); trying again next interval", e)
        return False
    manager.client = client
    with contextlib.suppress(Exception):
        old.close()
    log.info("database connection restored")
    return True


INSTANCE_COLUMNS = [
    "id",
    "provider",
    "provider_instance_id",
    "status",
    "gpu_name",
    "dph",
    "queues",
    "created_at",
    "last_heartbeat_at",
    "running_jobs",
]
SPEND_COLUMNS = [
    "instance_id",
    "provider",
    "provider_instance_id",
    "gpu_name",
    "status",
    "dph",
    "hours",
    "cost_usd",
    "end_reason",
]


def _status(client: Client, ms: ManagerSettings, days: int, *, as_json: bool = False) -> int:
    """One dict of what `status` shows, printed as text or as JSON."""
    if days < 1:
        raise CommandError(f"--days must be at least 1, got {days}")
    tz = ms.policy.budget_tz
    status = {
        "caps": {"daily_budget_usd": ms.policy.daily_budget, "max_total_dph": ms.policy.max_total_dph},
        "budget_tz": tz,
        "instances": client.call("select * from gpuq.manager_instances()"),
        "spend_today_usd": float(client.call("select gpuq.spend_today(%s) as usd", (tz,))[0]["usd"]),
        "spend_by_day": client.call("select * from gpuq.spend_by_day(%s, %s)", (tz, days)),
        "spend_by_instance_24h": client.call(
            "select * from gpuq.spend_by_instance(now() - interval '1 day')"
        ),
        # Every instance not running a job, with why it is billing, and today's idle hours by reason.
        "idle_by_reason": idle_by_reason(client, ms.policy),
        "idle_today_by_reason": idle_hours(client, tz),
    }
    # ... and the same as text, with the forecast.
    status["cost_lines"] = status_lines(
        client, ms.policy, status["idle_by_reason"], status["idle_today_by_reason"]
    )
    if as_json:
        print_json(status)
        return 0
    print(
        f"instances  (select * from gpuq.manager_instances())  caps: ${ms.policy.daily_budget:.2f}/day, "
        f"${ms.policy.max_total_dph:.2f}/h"
    )
    print_table(status["instances"], INSTANCE_COLUMNS)
    print("\n" + "\n".join(status["cost_lines"]))
    print(f"\nspend today ({tz}): ${status['spend_today_usd']:.4f}")
    print(f"\nspend per day  (select * from gpuq.spend_by_day('{tz}', {days}))")
    print_table(status["spend_by_day"])
    print("\nspend per instance, last 24 h  (select * from gpuq.spend_by_instance(now() - interval '1 day'))")
    print_table(status["spend_by_instance_24h"], SPEND_COLUMNS)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuq manager", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args, Settings.from_env())
    except CommandError as e:
        print(f"gpuq manager: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
