"""A fleet of N workers on one small Postgres, directly and through pgbouncer in transaction mode.

    .venv/bin/python scripts/bench_fleet.py                       # direct 10, 50; pooled 10, 100, 500, 1000
    .venv/bin/python scripts/bench_fleet.py --direct 10 --pooled 10,100 --busy 10 --idle 10   # quicker
    .venv/bin/python scripts/bench_fleet.py --tick-only      # the manager's SQL: 500 instances, 10^6 jobs

Each simulated worker is what `gpuq worker` does with its one connection, on the real client and the real
SQL (threads in this one process, not N processes): it enrolls and registers an instance, claims one job at
a time, "runs" it (--job-ms), completes it, heartbeats every --heartbeat seconds naming what it holds, and,
when the queue is empty, waits: directly, for a NOTIFY on its own connection (as the worker does, with a
--poll fallback); through the pooler, which cannot LISTEN, it polls every --poll seconds (phase-spread).
An app enqueues --rate jobs a second during the busy phase. Then the fleet idles for --idle seconds.

Reported per run: claim latency p50/p95/p99 (claims that got a job; and empty polls), pickup latency
(enqueue commit returned -> claim returned), heartbeat latency, Postgres server connections (peak, sampled),
Postgres CPU (all postgres processes' user+system time from /proc, per second of the idle phase, per idle
worker; and pgbouncer's), and whether every job ran exactly once.

The manager part (--tick, on by default): 500 rented instances and 10^6 finished jobs spread over a week
(inserted straight into the table as its owner, the new-job trigger off, to save the hour that driving them
through claim and complete would take), then the SQL of one manager tick, each call timed (median of 5).

The machine is shared: the load average is printed with each run. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gpuq.client import JOBS_CHANNEL, Client, InstanceClient, Job
from gpuq.db import connect
from gpuq.migrate import migrate
from gpuq.settings import Settings

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
QUEUE = "fleet"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def ms(values: list[float]) -> str:
    return f"{pct(values, 50) * 1000:.1f} / {pct(values, 95) * 1000:.1f} / {pct(values, 99) * 1000:.1f}"


def settings(url: str, pooled: bool) -> Settings:
    return Settings(url, Path(tempfile.gettempdir()), pooled, 60, 5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def database(admin_url: str) -> Iterator[str]:
    name = f"gpuq_bench_fleet_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = make_conninfo(admin_url, dbname=name)
    try:
        with connect(url, settings(url, False)) as conn:
            migrate(conn)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@contextmanager
def pgbouncer(url: str, pool_size: int, max_clients: int) -> Iterator[tuple[str, psutil.Process]]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    info = conninfo_to_dict(url)
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="gpuq-bench-pgbouncer-"))
    tmp.chmod(0o777)  # pgbouncer runs as the postgres user
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"gpuq = host={info.get('host', '127.0.0.1')} port={info.get('port', 5432)} dbname={info['dbname']} "
        f"user={info.get('user', 'postgres')}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\npool_mode = transaction\n"
        f"unix_socket_dir =\nlogfile = {tmp}/pgbouncer.log\npidfile = {tmp}/pgbouncer.pid\n"
        f"max_client_conn = {max_clients}\ndefault_pool_size = {pool_size}\nlisten_backlog = 4096\n"
    )
    ini.chmod(0o644)
    # its log goes to the logfile; a pipe nobody reads would fill and stall it (after ~490 logins)
    proc = subprocess.Popen([binary, "-u", "postgres", str(ini)], stderr=subprocess.DEVNULL)
    pooled = f"postgresql://postgres@127.0.0.1:{port}/gpuq"
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(pooled, prepare_threshold=None).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    try:
        yield pooled, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def backend_cpu_seconds(url: str) -> float:
    """User + system CPU seconds of the Postgres backends serving this database (the fleet's own
    connections, or pgbouncer's server connections; not other databases' work on a shared machine)."""
    with psycopg.connect(url, autocommit=True) as c:
        others = (
            "select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"
        )
        pids = [r[0] for r in c.execute(others)]
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


@dataclass
class Figures:
    claims: list[float] = field(default_factory=list)  # seconds, claims that got a job
    polls: list[float] = field(default_factory=list)  # seconds, claims that found nothing
    pickups: list[float] = field(default_factory=list)
    heartbeats: list[float] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SimWorker(threading.Thread):
    def __init__(
        self,
        url: str,
        pooled: bool,
        secret: str,
        args: argparse.Namespace,
        enqueued: dict[int, float],
        figures: Figures,
        stop: threading.Event,
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.pooled, self.secret, self.args = url, pooled, secret, args
        self.enqueued, self.figures, self.stop = enqueued, figures, stop
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a benchmark reports it; the rest of the fleet goes on
            with self.figures.lock:
                self.figures.errors.append(f"{type(exc).__name__}: {exc}")
            self.ready.set()

    def _run(self) -> None:
        for attempt in range(5):  # a fleet comes up over minutes, not all in one second: retry a connect
            try:
                client = Client.connect(
                    self.url, settings(self.url, self.pooled), application_name="gpuq worker"
                )
                break
            except psycopg.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)
        inst: InstanceClient = client.as_instance(self.secret)
        inst.register()
        if not self.pooled:
            client.conn.execute(f"listen {JOBS_CHANNEL}")
        rng = random.Random(self.secret)
        next_beat = time.monotonic() + rng.uniform(0, self.args.heartbeat)
        next_poll = time.monotonic() + rng.uniform(0, self.args.poll)
        held: list[Job] = []
        self.ready.set()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                t0 = time.perf_counter()
                inst.heartbeat([(j.id, j.lease_token) for j in held if j.lease_token])  # type: ignore[misc]
                self.figures.heartbeats.append(time.perf_counter() - t0)
                next_beat = now + self.args.heartbeat
            if now >= next_poll or not self.pooled:
                t0 = time.perf_counter()
                jobs = inst.claim([QUEUE], 1)
                t1 = time.perf_counter()
                got_at = time.time()
                if jobs:
                    job = jobs[0]
                    self.figures.claims.append(t1 - t0)
                    if job.id in self.enqueued:
                        self.figures.pickups.append(got_at - self.enqueued[job.id])
                    held = [job]
                    time.sleep(self.args.job_ms / 1000)
                    inst.complete(job.id, job.lease_token)  # type: ignore[arg-type]
                    held = []
                    with self.figures.lock:
                        self.figures.done.append(job.id)
                    next_poll = time.monotonic()  # busy: ask again at once
                    continue
                self.figures.polls.append(t1 - t0)
                next_poll = time.monotonic() + self.args.poll
            wait = max(0.0, min(next_beat, next_poll if self.pooled else next_beat) - time.monotonic())
            if self.pooled:
                self.stop.wait(min(wait, 0.5))
            else:  # as the worker waits: for a NOTIFY on its one connection, up to the next heartbeat
                if any(True for _ in client.conn.notifies(timeout=min(wait, self.args.poll), stop_after=1)):
                    next_poll = time.monotonic()
        client.close()


def fleet_run(admin_url: str, n: int, pooled: bool, args: argparse.Namespace) -> str:
    with database(admin_url) as url:
        with Client.connect(url, settings(url, False)) as owner:
            secrets_ = [owner.enroll([QUEUE], max_concurrency=1)[1] for _ in range(n)]
        figures, stop, enqueued = Figures(), threading.Event(), {}
        pool = (
            contextmanager(lambda: (yield (url, None)))()
            if not pooled
            else pgbouncer(url, args.pool_size, n + 50)
        )
        with pool as (worker_url, bouncer):
            workers = [SimWorker(worker_url, pooled, s, args, enqueued, figures, stop) for s in secrets_]
            for w in workers:
                w.start()
                time.sleep(0.002)  # do not storm the server with N connects at once
            for w in workers:
                w.ready.wait(60)
            if figures.errors:
                stop.set()
                mode = "pooled" if pooled else "direct"
                return f"{mode} N={n}: {figures.errors[0]} ({len(figures.errors)} workers failed)"
            time.sleep(2)
            peak = [0]
            sampling = threading.Event()

            def sample() -> None:  # not counted in the backends' CPU (its own queries are not the fleet's)
                with psycopg.connect(url, autocommit=True, application_name="bench sampler") as c:
                    while not sampling.is_set():
                        row = c.execute(
                            "select count(*) from pg_stat_activity where datname = current_database()"
                        ).fetchone()
                        peak[0] = max(peak[0], int(row[0]) - 1 if row else 0)  # not this sampler
                        sampling.wait(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            # busy phase: an app enqueues --rate jobs a second
            with psycopg.connect(url, autocommit=True) as app:
                end = time.monotonic() + args.busy
                total = 0
                while time.monotonic() < end:
                    job_id = app.execute("select gpuq.enqueue(%s, '{}'::jsonb)", (QUEUE,)).fetchone()[0]  # type: ignore[index]
                    enqueued[job_id] = time.time()
                    total += 1
                    time.sleep(1 / args.rate)
            drain_end = time.monotonic() + 30
            while len(figures.done) < total and time.monotonic() < drain_end:
                time.sleep(0.1)
            # idle phase: the fleet only polls and heartbeats
            busy_polls = len(figures.polls)
            cpu0, t0 = backend_cpu_seconds(url), time.monotonic()
            b0 = sum(bouncer.cpu_times()[:2]) if bouncer else 0.0
            time.sleep(args.idle)
            cpu = (backend_cpu_seconds(url) - cpu0) / (time.monotonic() - t0)
            bcpu = (sum(bouncer.cpu_times()[:2]) - b0) / (time.monotonic() - t0) if bouncer else 0.0
            idle_polls = len(figures.polls) - busy_polls
            sampling.set()
            stop.set()
            deadline = time.monotonic() + 30
            for w in workers:
                w.join(max(0.1, deadline - time.monotonic()))
            stuck = sum(w.is_alive() for w in workers)
        done = figures.done
        exact = len(done) == len(set(done)) == total
        return (
            f"{'pooled' if pooled else 'direct':>6} N={n:<5} load {os.getloadavg()[0]:.2f} | "
            f"claim p50/95/99 {ms(figures.claims)} ms (empty poll {ms(figures.polls)}) | "
            f"pickup p50/95 {ms(figures.pickups).rsplit(' / ', 1)[0]} ms | "
            f"heartbeat p50/95 {ms(figures.heartbeats).rsplit(' / ', 1)[0]} ms"
            f" | server connections peak {peak[0]} | idle: its Postgres backends {cpu * 100:.1f}% of a core"
            f" ({cpu / n * 1e6:.0f} µs/s per worker; {idle_polls / args.idle:.0f} polls/s)"
            + (f", pgbouncer {bcpu * 100:.1f}%" if pooled else "")
            + f" | jobs {len(done)}/{total} {'each once' if exact else 'NOT exactly once'}"
            + (f" | {stuck} workers did not stop" if stuck else "")
        )


def tick_sql(admin_url: str, instances: int, jobs: int) -> None:
    """The manager's SQL per tick on a big history."""
    with database(admin_url) as url, psycopg.connect(url, autocommit=True) as conn:
        t0 = time.monotonic()
        conn.execute(
            """select gpuq.record_rent('vast', 'p' || g, 'o' || g, 'm' || g, 'gpuq:bench:' || (g %% 3),
                                       'RTX 4090', 1, 24000, 0.35, true, array['q' || (g %% 3)], 'bench', 1,
                                       sha256(('s' || g)::bytea))
                 from generate_series(1, %s) g""",
            (instances,),
        )
        conn.execute("alter table gpuq.jobs disable trigger jobs_check_new")
        conn.execute(
            """insert into gpuq.jobs (queue, status, attempt, instance_id, started_at, finished_at, result,
                                      created_at, run_after)
               select 'q' || (g %% 3), 'succeeded', 1, 1 + g %% %s, t, t + interval '20 seconds', '{}', t, t
                 from (select g, now() - random() * interval '7 days' as t
                         from generate_series(1, %s) g) as x""",
            (instances, jobs),
        )
        conn.execute("alter table gpuq.jobs enable trigger jobs_check_new")
        conn.execute("insert into gpuq.jobs (queue) select 'q' || (g % 3) from generate_series(1, 2000) g")
        conn.execute("vacuum analyze")
        took = time.monotonic() - t0
        print(f"   ({instances} instances, {jobs:,} finished jobs, 2,000 queued in {took:.0f} s)")
        calls = {
            "reap_expired()": "select gpuq.reap_expired()",
            "manager_instances()": "select * from gpuq.manager_instances()",
            "manager_known('vast')": "select * from gpuq.manager_known('vast')",
            "manager_queues()": "select * from gpuq.manager_queues()",
            "manager_throughput()": "select * from gpuq.manager_throughput()",
            "spend_today('UTC')": "select gpuq.spend_today('UTC')",
            "avoided_machine_ids()": "select gpuq.avoided_machine_ids()",
            "record_tick()": "select gpuq.record_tick()",
        }
        total = 0.0
        for name, sql in calls.items():
            times = []
            for _ in range(5):
                t = time.perf_counter()
                conn.execute(sql).fetchall()
                times.append(time.perf_counter() - t)
            total += statistics.median(times)
            print(f"   {name:<24} {statistics.median(times) * 1000:8.1f} ms")
        print(f"   one tick's SQL, in all: {total * 1000:.0f} ms (load average {os.getloadavg()[0]:.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=ADMIN_URL)
    parser.add_argument("--direct", default="10,50", help="fleet sizes connected directly")
    parser.add_argument("--pooled", default="10,100,500,1000", help="fleet sizes through pgbouncer")
    parser.add_argument("--pool-size", type=int, default=20, help="pgbouncer's server connections")
    parser.add_argument("--busy", type=float, default=15.0, help="seconds of enqueuing")
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle fleet, for its cost")
    parser.add_argument("--rate", type=float, default=20.0, help="jobs enqueued a second")
    parser.add_argument("--job-ms", type=float, default=50.0, help="how long a job runs")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between an idle worker's polls")
    parser.add_argument("--tick-only", action="store_true", help="only the manager's SQL")
    parser.add_argument("--no-tick", action="store_true", help="skip the manager's SQL")
    args = parser.parse_args()
    with psycopg.connect(args.url) as c:
        row = c.execute("show max_connections").fetchone()
    print(f"Postgres max_connections {row[0] if row else '?'}; {os.cpu_count()} CPUs")
    if not args.tick_only:
        for pooled, sizes in ((False, args.direct), (True, args.pooled)):
            for n in (int(s) for s in sizes.split(",") if s.strip()):
                print(fleet_run(args.url, n, pooled, args), flush=True)
    if not args.no_tick:
        print("manager tick SQL, 500 rented instances, 10^6 finished jobs (median of 5 calls each):")
        tick_sql(args.url, 500, 1_000_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
