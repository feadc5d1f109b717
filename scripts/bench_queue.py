"""Benchmark gpuq's queue against PgQueuer 1.6 on the same Postgres, in one run.

    .venv/bin/python scripts/bench_queue.py                  # defaults: -n 20000 -k 2 --batch 50
    .venv/bin/python scripts/bench_queue.py --skip-flat      # drain and latency only (~1 minute)
    .venv/bin/python scripts/bench_queue.py --flat-max 100000 --history 100000   # a quicker flat check

Parts (times are for the defaults on a 2-core machine with Postgres on the same cores):
  1. drain (~20 s): N no-op jobs pre-queued with one INSERT, then K worker processes released by one
     barrier. gpuq: claim(batch) -> complete_many until the queue is empty. PgQueuer: one PgQueuer per
     process, mode=drain, batch_size=batch (the asyncpg and the psycopg driver), plus the shape of its
     own tools/benchmark.py (one process, 5 consumers, batch 10). jobs/s = N / (last worker done -
     barrier). Afterwards each run is checked: every job finished exactly once.
  2. idle pickup latency (~20 s): one idle worker; a producer commits one job at a time, ~20 ms apart,
     and notes time.time() when the commit returns; the worker notes time.time() once the job is
     claimed (gpuq: after Listener.wait and claim return; PgQueuer: first line of the entrypoint).
  3. claim cost vs table size (~5 min): 10^3..10^6 queued jobs, then up to 10^6 finished jobs in the
     history (driven to succeeded through claim_jobs/complete_jobs, time-boxed by --history-seconds:
     about 650k-730k fit in the default 240 s here), timing single and batch claims, and
     auto_explain's plan of one claim at the largest size (buffers touched, index used).
  Total about 5.5 minutes.

Each system gets its own fresh database on the server at --url; both are dropped at the end. Only
127.0.0.1 is used. Other work on the same server adds noise: run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gpuq.client import JOBS_CHANNEL, Client, InstanceClient, Listener
from gpuq.db import connect
from gpuq.migrate import migrate
from gpuq.settings import Settings

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DRAIN_QUEUE = "bench"
LATENCY_QUEUE = "lat"
WARMUP = 10  # latency samples thrown away: connection warm-up and psycopg's prepare after 5 uses
SPACING_S = 0.020  # between latency samples, so the worker is idle (blocked in LISTEN) at each insert
DRAIN_TIMEOUT_S = 600.0
END_TO_END = "INSERT sent->claimed"


# --- small helpers ---------------------------------------------------------------------------------


def bench_instance(client: Client, queue: str) -> InstanceClient:
    """An instance serving `queue` with room for any batch here, as `gpuq enroll` makes one."""
    _, secret = client.enroll([queue], max_concurrency=4096)
    instance = client.as_instance(secret)
    instance.register()
    return instance


def settings_for(url: str) -> Settings:
    return Settings(
        database_url=url,
        data_dir=Path(tempfile.gettempdir()),
        transaction_pooler=False,
        lease_seconds=60,
        poll_seconds=1.0,
    )


def create_database(admin_url: str, prefix: str) -> str:
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return make_conninfo(admin_url, dbname=name)


def drop_database(admin_url: str, url: str) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


def as_dsn(url: str) -> str:
    """asyncpg wants a URL; make_conninfo gives key=value pairs."""
    d = conninfo_to_dict(url)
    user = f"{d['user']}@" if d.get("user") else ""
    return f"postgresql://{user}{d.get('host', '127.0.0.1')}:{d.get('port', 5432)}/{d['dbname']}"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@contextmanager
def part(title: str) -> Iterator[None]:
    print(f"\n== {title}", flush=True)
    t0 = time.monotonic()
    yield
    print(f"   ({title}: {time.monotonic() - t0:.1f} s)", flush=True)


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """uvloop when installed: PgQueuer's own benchmark runs on it, so it gets its best case."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)


def backend_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) that these Postgres backends have used; NaN when /proc does not
    show them (a server on another machine)."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total


@contextmanager
def cpu_meter(pids: list[int], into: dict[str, float]) -> Iterator[None]:
    """CPU this process and its backends use inside the block: where the work per job goes."""
    client, server = time.process_time(), backend_cpu(pids)
    yield
    into["client_cpu"] = time.process_time() - client
    into["server_cpu"] = backend_cpu(pids) - server


def cpu_per_job(outs: list[dict[str, float]], n: int) -> str:
    client = sum(o["client_cpu"] for o in outs) / n * 1e6
    server = sum(o["server_cpu"] for o in outs) / n * 1e6
    return f"CPU per job: client {client:.0f} µs + Postgres {server:.0f} µs"


def collect(results: Any, procs: list[Any], timeout: float) -> list[Any]:
    """One result per worker process; a worker's exception arrives as ("error", text)."""
    outs = []
    deadline = time.monotonic() + timeout
    for _ in procs:
        out = results.get(timeout=max(1.0, deadline - time.monotonic()))
        if isinstance(out, tuple) and out and out[0] == "error":
            raise RuntimeError(f"a worker failed: {out[1]}")
        outs.append(out)
    for p in procs:
        p.join(timeout=30)
    return outs


def guarded(target: Callable[..., Any], results: Any, *args: Any) -> None:
    """Run a worker body in the child and hand its answer (or its error) back."""
    quiet_logs()
    try:
        results.put(target(*args))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


@dataclass
class DrainResult:
    name: str
    jobs: int
    seconds: float
    detail: str

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


@dataclass
class LatencyResult:
    name: str
    ms: list[float]
    lost: int
    parts: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> str:
        lines = [
            f"   {self.name:<28} p50 {pct(self.ms, 50):6.2f} ms   p95 {pct(self.ms, 95):6.2f} ms   "
            f"max {max(self.ms):7.2f} ms   n={len(self.ms)}   lost={self.lost}"
        ]
        for name, ms in self.parts.items():
            lines.append(f"     {name:<26} p50 {pct(ms, 50):6.2f} ms   p95 {pct(ms, 95):6.2f} ms")
        return "\n".join(lines)


# --- gpuq: drain -----------------------------------------------------------------------------------


def gpuq_drain_worker(url: str, index: int, batch: int, barrier: Barrier) -> dict[str, float]:
    """Answers jobs done, when it finished, claims made, seconds spent in claim and in complete,
    and CPU seconds used here and by its backend."""
    client = Client.connect(url, settings_for(url))
    instance = bench_instance(client, DRAIN_QUEUE)
    out = {"done": 0, "claims": 0, "in_claim": 0.0, "in_complete": 0.0}
    barrier.wait(timeout=120)
    with cpu_meter([client.conn.info.backend_pid], out):
        while True:
            t0 = time.perf_counter()
            jobs = instance.claim([DRAIN_QUEUE], batch)
            t1 = time.perf_counter()
            out["in_claim"] += t1 - t0
            if not jobs:
                break
            out["claims"] += 1
            lost = instance.complete_many([(j.id, j.lease_token, None) for j in jobs])
            out["in_complete"] += time.perf_counter() - t1
            if lost:
                raise RuntimeError(f"jobs {lost} were no longer held")
            out["done"] += len(jobs)
    out["end"] = time.time()
    client.close()
    return out


def run_drain_processes(
    target: Callable[..., dict[str, float]], worker_args: list[tuple[Any, ...]]
) -> tuple[list[dict[str, float]], float, str]:
    """One process per worker_args entry, all released by one barrier (each gets it as its last
    argument); answers their results, the seconds from release to the last finish, and jobs per worker."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(worker_args) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=guarded, args=(target, results, *a, barrier)) for a in worker_args]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    t0 = time.time()
    outs = collect(results, procs, DRAIN_TIMEOUT_S)
    seconds = max(o["end"] for o in outs) - t0
    return outs, seconds, "/".join(str(o["done"]) for o in outs)


def gpuq_drain(url: str, n: int, k: int, batch: int) -> DrainResult:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into gpuq.jobs (queue) select %s from generate_series(1, %s)", (DRAIN_QUEUE, n))
        conn.execute("vacuum analyze gpuq.jobs")
    outs, seconds, per_worker = run_drain_processes(gpuq_drain_worker, [(url, i, batch) for i in range(k)])
    claims = sum(o["claims"] for o in outs)
    claim_ms = sum(o["in_claim"] for o in outs) / claims * 1000
    complete_ms = sum(o["in_complete"] for o in outs) / claims * 1000

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """select count(*) filter (where status = 'succeeded' and attempt = 1) as ok,
                      count(*) as total,
                      (select count(*) from gpuq.job_events) as events
                 from gpuq.jobs where queue = %s""",
            (DRAIN_QUEUE,),
        ).fetchone()
    assert row is not None
    # exactly once: every job succeeded on its first attempt, the workers completed n in all, and nothing
    # was retried, expired or released (a healthy drain writes no history row)
    done = sum(o["done"] for o in outs)
    if not (row[0] == row[1] == done == n and row[2] == 0):
        raise RuntimeError(
            f"gpuq drain check failed: succeeded/total/events = {row}, completed {done}, want {n}"
        )
    return DrainResult(
        f"gpuq ({k} proc, batch {batch})",
        n,
        seconds,
        f"per worker {per_worker}; {cpu_per_job(outs, n)}; per batch: claim {claim_ms:.2f} ms, "
        f"complete_many {complete_ms:.2f} ms; all {n} succeeded exactly once",
    )


# --- gpuq: pickup latency --------------------------------------------------------------------------


def gpuq_latency_worker(
    url: str, batch: int, ready: Event, stop: Event
) -> tuple[dict[int, float], dict[int, float]]:
    """Answers, per job id, when the worker woke for it and when its claim returned."""
    settings = settings_for(url)
    client = Client.connect(url, settings)
    instance = bench_instance(client, LATENCY_QUEUE)
    listener = Listener(url, settings, [JOBS_CHANNEL])
    listener.start()
    woke: dict[int, float] = {}
    claimed: dict[int, float] = {}
    while not stop.is_set():
        listener.wait(1.0)  # returns at the first NOTIFY; the 1 s timeout is the polling fallback
        t_wake = time.time()
        # as a real worker does: claim until nothing is left, then wait again
        while jobs := instance.claim([LATENCY_QUEUE], batch):
            t = time.time()
            for j in jobs:
                woke[j.id], claimed[j.id] = t_wake, t
            ready.set()
            instance.complete_many([(j.id, j.lease_token, None) for j in jobs])
    listener.close()
    client.close()
    return woke, claimed


def gpuq_latency(url: str, samples: int, batch: int) -> LatencyResult:
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=guarded, args=(gpuq_latency_worker, results, url, batch, ready, stop))
    proc.start()
    sent: dict[int, float] = {}
    before: dict[int, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        insert = "insert into gpuq.jobs (queue) values (%s) returning id"
        conn.execute(insert, (LATENCY_QUEUE,))  # the first job tells us the worker is up
        if not ready.wait(120):
            raise RuntimeError("the gpuq latency worker did not start")
        for i in range(WARMUP + samples):
            time.sleep(SPACING_S)
            t_before = time.time()
            row = conn.execute(insert, (LATENCY_QUEUE,)).fetchone()
            t = time.time()  # autocommit: the INSERT has committed when execute returns
            assert row is not None
            if i >= WARMUP:
                sent[row[0]], before[row[0]] = t, t_before
    time.sleep(0.5)  # let the last sample through
    stop.set()
    ((woke, claimed),) = collect(results, [proc], 60)
    result = latency_result("gpuq", sent, claimed, before)
    # where the time goes: commit -> worker awake (NOTIFY), then awake -> claim returned
    # the NOTIFY can reach the worker before the producer hears its own commit: negative is possible
    result.parts |= {
        "commit->NOTIFY woke worker": [(woke[i] - t) * 1000 for i, t in sent.items() if i in woke],
        "woke->claim returned": [(claimed[i] - woke[i]) * 1000 for i in sent if i in claimed],
    }
    return result


def latency_result(
    name: str, sent: dict[int, float], claimed: dict[int, float], before: dict[int, float]
) -> LatencyResult:
    """sent: when the producer's INSERT returned (committed); before: when it was sent."""
    ms = [(claimed[i] - t) * 1000 for i, t in sent.items() if i in claimed]
    return LatencyResult(
        name,
        ms,
        len(sent) - len(ms),
        {
            "producer's INSERT round trip": [(sent[i] - t) * 1000 for i, t in before.items()],
            END_TO_END: [(claimed[i] - t) * 1000 for i, t in before.items() if i in claimed],
        },
    )


# --- PgQueuer --------------------------------------------------------------------------------------


async def pgq_driver(url: str, driver: str) -> tuple[Any, int]:
    """A PgQueuer driver and its backend's pid."""
    from pgqueuer import AsyncpgDriver, PsycopgDriver

    if driver == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(dsn=as_dsn(url))
        return AsyncpgDriver(conn), conn.get_server_pid()
    aconn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    return PsycopgDriver(aconn), aconn.info.backend_pid


async def pgq_prepare(url: str, n: int) -> None:
    """Install PgQueuer's schema if needed, empty its tables and pre-queue n jobs in one INSERT."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn=as_dsn(url))
    queries = Queries(AsyncpgDriver(conn))
    if not await queries.schema_is_installed():
        await queries.install()
    await queries.clear_queue()
    await queries.clear_queue_log()
    await queries.clear_statistics_log()
    if n:
        await queries.enqueue([DRAIN_QUEUE] * n, [None] * n, [0] * n)
    await conn.execute("vacuum analyze pgqueuer")
    await conn.close()


async def pgq_drain_async(
    url: str, driver: str, consumers: int, batch: int, barrier: Barrier
) -> dict[str, float]:
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    done = 0
    pgqs, pids = [], []
    for _ in range(consumers):
        drv, pid = await pgq_driver(url, driver)
        pgq = PgQueuer(drv)
        pids.append(pid)

        @pgq.entrypoint(DRAIN_QUEUE)
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        pgqs.append(pgq)
    out: dict[str, float] = {}
    barrier.wait(timeout=120)  # blocking is fine here: nothing else runs on this loop yet
    # the backends are read before run() ends: PgQueuer closes its connection on the way out
    with cpu_meter(pids, out):
        await asyncio.gather(*(p.run(batch_size=batch, mode=QueueExecutionMode.drain) for p in pgqs))
    out["done"] = done
    out["end"] = time.time()
    return out


def pgq_drain_worker(url: str, driver: str, consumers: int, batch: int, barrier: Barrier) -> dict[str, float]:
    return run_async(pgq_drain_async(url, driver, consumers, batch, barrier))


def pgq_drain(url: str, n: int, procs_n: int, consumers: int, batch: int, driver: str) -> DrainResult:
    run_async(pgq_prepare(url, n))
    outs, seconds, per_worker = run_drain_processes(
        pgq_drain_worker, [(url, driver, consumers, batch)] * procs_n
    )

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """select count(*), count(distinct job_id), (select count(*) from pgqueuer)
                 from pgqueuer_log where status = 'successful'"""
        ).fetchone()
    assert row is not None
    if not (row[0] == row[1] == n and row[2] == 0):
        raise RuntimeError(f"PgQueuer drain check failed: logged/distinct/left = {row}, want {n}/{n}/0")
    shape = f"{procs_n} proc x {consumers} consumer{'s' if consumers > 1 else ''}, batch {batch}"
    return DrainResult(
        f"PgQueuer {driver} ({shape})",
        n,
        seconds,
        f"per process {per_worker}; {cpu_per_job(outs, n)}; all {n} logged successful exactly once",
    )


async def pgq_latency_async(url: str, driver: str, batch: int, ready: Event, stop: Event) -> dict[int, float]:
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    pgq = PgQueuer((await pgq_driver(url, driver))[0])
    claimed: dict[int, float] = {}

    @pgq.entrypoint(LATENCY_QUEUE)
    async def record(job: Job) -> None:
        claimed[job.id] = time.time()
        ready.set()

    async def watch_stop() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.1)
        pgq.shutdown.set()

    watcher = asyncio.create_task(watch_stop())
    await pgq.run(batch_size=batch)
    await watcher
    return claimed


def pgq_latency_worker(url: str, driver: str, batch: int, ready: Event, stop: Event) -> dict[int, float]:
    return run_async(pgq_latency_async(url, driver, batch, ready, stop))


async def pgq_produce(url: str, samples: int, ready: Event) -> tuple[dict[int, float], dict[int, float]]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn=as_dsn(url))
    queries = Queries(AsyncpgDriver(conn))
    await queries.enqueue(LATENCY_QUEUE, None)  # the first job tells us the worker is up
    for _ in range(1200):
        if ready.is_set():
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the PgQueuer latency worker did not start")
    sent: dict[int, float] = {}
    before: dict[int, float] = {}
    for i in range(WARMUP + samples):
        await asyncio.sleep(SPACING_S)
        t_before = time.time()
        (job_id,) = await queries.enqueue(LATENCY_QUEUE, None)
        t = time.time()  # asyncpg outside a transaction: committed when the call returns
        if i >= WARMUP:
            sent[job_id], before[job_id] = t, t_before
    await conn.close()
    return sent, before


def pgq_latency(url: str, samples: int, batch: int, driver: str) -> LatencyResult:
    run_async(pgq_prepare(url, 0))
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=guarded, args=(pgq_latency_worker, results, url, driver, batch, ready, stop))
    proc.start()
    sent, before = run_async(pgq_produce(url, samples, ready))
    time.sleep(0.5)
    stop.set()
    (claimed,) = collect(results, [proc], 60)
    return latency_result(f"PgQueuer {driver}", sent, claimed, before)


# --- gpuq: claim cost vs table size ----------------------------------------------------------------


@dataclass
class ClaimCost:
    label: str
    single_us: list[float]  # claim_jobs(p_limit=1), client round trip
    single_rt_us: list[float]  # claim + complete_jobs of that one job
    batch_us: list[float]  # claim_jobs(p_limit=50)
    server_us: float  # claim_jobs(p_limit=1) execution time inside Postgres, p50
    buffers: int  # shared buffers one claim_jobs(p_limit=1) touches, p50: noise-free

    def row(self) -> str:
        return (
            f"   {self.label:<34} {pct(self.single_us, 50):7.0f} {mean(self.single_us):7.0f} "
            f"{pct(self.single_us, 95):7.0f} {mean(self.single_rt_us):8.0f} "
            f"{pct(self.batch_us, 50):8.0f} {pct(self.batch_us, 50) / 50:7.1f} "
            f"{self.server_us:8.0f} {self.buffers:8d}"
        )


COST_HEADER = (
    f"   {'table':<34} {'claim(1) µs':>23} {'+done µs':>8} {'claim(50) µs':>16} "
    f"{'claim(1) in server':>17}\n"
    f"   {'':<34} {'p50':>7} {'mean':>7} {'p95':>7} {'mean':>8} {'p50':>8} {'per job':>7} "
    f"{'exec µs':>8} {'buffers':>8}"
)


def server_claim_cost(
    conn: psycopg.Connection[Any], instance: InstanceClient, reps: int = 30
) -> tuple[float, int]:
    """p50 execution time (µs) and shared buffers of claim_jobs(p_limit=1), read from EXPLAIN ANALYZE
    (the Function Scan's figures include every statement inside the function); rolled back."""
    times, buffers = [], []
    for _ in range(reps):
        with conn.transaction(force_rollback=True):
            row = conn.execute(
                "explain (analyze, buffers, format json) select * from gpuq.claim_jobs(%s, %s, 1)",
                (instance.secret, [DRAIN_QUEUE]),
            ).fetchone()
        assert row is not None
        plan = (row["QUERY PLAN"] if isinstance(row, dict) else row[0])[0]
        times.append(plan["Execution Time"] * 1000)
        buffers.append(plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"])
    return pct(times, 50), int(pct(buffers, 50))


def noise(url: str) -> str:
    """How busy the machine is right now, so figures from different runs can be weighed."""
    with psycopg.connect(url, autocommit=True) as conn:
        ts, commits = [], []
        for _ in range(100):
            t0 = time.perf_counter()
            conn.execute("select 1")
            t1 = time.perf_counter()
            conn.execute("select txid_current()")  # takes an xid: its commit waits for a WAL flush
            commits.append((time.perf_counter() - t1) * 1e6)
            ts.append((t1 - t0) * 1e6)
    return (
        f"load average {os.getloadavg()[0]:.2f}; round trip p50: 'select 1' {pct(ts, 50):.0f} µs, "
        f"a commit with WAL flush {pct(commits, 50):.0f} µs"
    )


def insert_queued(conn: psycopg.Connection[Any], n: int) -> None:
    if n > 0:
        conn.execute("insert into gpuq.jobs (queue) select %s from generate_series(1, %s)", (DRAIN_QUEUE, n))


def measure_claims(
    client: Client,
    conn: psycopg.Connection[Any],
    instance: InstanceClient,
    label: str,
    singles: int,
    batches: int,
) -> ClaimCost:
    """Time single and batch claims; each claimed job is refilled (untimed) so the depth holds."""
    for _ in range(10):  # warm-up: psycopg prepares the statement after 5 uses
        jobs = instance.claim([DRAIN_QUEUE], 1)
        instance.complete_many([(j.id, j.lease_token, None) for j in jobs])
        insert_queued(conn, len(jobs))
    single, single_rt, batch = [], [], []
    for _ in range(singles):
        t0 = time.perf_counter()
        jobs = instance.claim([DRAIN_QUEUE], 1)
        t1 = time.perf_counter()
        instance.complete_many([(j.id, j.lease_token, None) for j in jobs])
        t2 = time.perf_counter()
        single.append((t1 - t0) * 1e6)
        single_rt.append((t2 - t0) * 1e6)
        insert_queued(conn, len(jobs))
    for _ in range(batches):
        t0 = time.perf_counter()
        jobs = instance.claim([DRAIN_QUEUE], 50)
        batch.append((time.perf_counter() - t0) * 1e6)
        instance.complete_many([(j.id, j.lease_token, None) for j in jobs])
        insert_queued(conn, len(jobs))
    server_us, buffers = server_claim_cost(client.conn, instance)
    cost = ClaimCost(label, single, single_rt, batch, server_us, buffers)
    print(cost.row(), flush=True)
    return cost


def drive_to_succeeded(conn: psycopg.Connection[Any], instance: InstanceClient, budget_s: float) -> int:
    """Claim and complete every queued job through gpuq's functions, 2000 per transaction: with
    10 000 complete_jobs can take seconds, when its plan walks every running job once per given job."""
    done = 0
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        row = conn.execute(
            """with c as (select id, lease_token from gpuq.claim_jobs(%s, %s, 2000, 600))
               select count(*) from gpuq.complete_jobs(%s, (select array_agg(id) from c),
                                                       (select array_agg(lease_token) from c))""",
            (instance.secret, [DRAIN_QUEUE], instance.secret),
        ).fetchone()
        assert row is not None
        if row[0] == 0:
            break
        done += row[0]
    return done


SCAN = re.compile(r"(Index Only Scan|Index Scan|Bitmap Index Scan|Seq Scan) ")


def auto_explained(url: str, body: Callable[[psycopg.Connection[Any]], None]) -> list[str]:
    """The plans of every statement body runs, nested ones included (auto_explain, sent to this
    session as notices), from the last of 8 runs, each rolled back: plpgsql plans the first 5 calls
    afresh, so the last shows the steady state."""
    notes: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        for setting in (
            "load 'auto_explain'",
            "set auto_explain.log_min_duration = 0",
            "set auto_explain.log_analyze = on",
            "set auto_explain.log_buffers = on",
            "set auto_explain.log_nested_statements = on",
            "set auto_explain.log_level = 'notice'",
        ):
            conn.execute(setting)
        for _ in range(8):
            notes.clear()
            with conn.transaction(force_rollback=True):
                body(conn)
    return notes


def note_summary(note: str) -> tuple[str, float, int]:
    """(first words of the statement, its execution ms, shared buffers of its top node)."""
    query = next((ln for ln in note.splitlines() if ln.startswith("Query Text:")), "")
    duration = re.search(r"duration: ([\d.]+) ms", note)
    hits = re.search(r"Buffers: shared hit=(\d+)(?: read=(\d+))?", note)
    buffers = int(hits[1]) + int(hits[2] or 0) if hits else 0
    return (
        " ".join(query.removeprefix("Query Text:").split())[:60],
        float(duration[1] if duration else 0),
        buffers,
    )


def profile_batch(url: str, instance: InstanceClient) -> None:
    """Where a batch's time goes inside Postgres: claim_jobs(p_limit=50), and complete_jobs of 50 jobs
    claimed (and committed) beforehand, as a worker's two separate transactions are."""
    queues = [DRAIN_QUEUE]
    with psycopg.connect(url, autocommit=True) as conn:
        held = conn.execute(
            "select id, lease_token from gpuq.claim_jobs(%s, %s, 50)", (instance.secret, queues)
        ).fetchall()
    ids, tokens = [r[0] for r in held], [r[1] for r in held]
    runs = {
        "claim_jobs(p_limit=50)": lambda c: c.execute(
            "select id from gpuq.claim_jobs(%s, %s, 50)", (instance.secret, queues)
        ).fetchall(),
        f"complete_jobs of {len(ids)}": lambda c: c.execute(
            "select * from gpuq.complete_jobs(%s, %s, %s)", (instance.secret, ids, tokens)
        ).fetchall(),
    }
    for title, body in runs.items():
        by_query: dict[str, list[float]] = {}
        for note in auto_explained(url, body):
            query, ms, _ = note_summary(note)
            by_query.setdefault(query, []).append(ms)
        print(f"   {title} inside Postgres (auto_explain; a statement's time includes those it runs):")
        for query, ms in sorted(by_query.items(), key=lambda kv: -sum(kv[1])):
            print(f"     {sum(ms):8.3f} ms  {len(ms):4d} x  {query}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select * from gpuq.complete_jobs(%s, %s, %s)", (instance.secret, ids, tokens))


def explain_claim(url: str, instance: InstanceClient) -> None:
    """auto_explain's plans of the statements inside one claim_jobs(p_limit=1)."""
    notes = auto_explained(
        url,
        lambda conn: conn.execute(
            "select * from gpuq.claim_jobs(%s, %s, 1)", (instance.secret, [DRAIN_QUEUE])
        ).fetchall(),
    )
    # Planning is a large share of a claim: plpgsql replans claim_jobs' statements on every call when
    # the generic plan looks dearer than the custom one (LIMIT p_limit is unknown to a generic plan).
    with psycopg.connect(url, autocommit=True) as conn:
        default_us, _ = server_claim_cost(conn, instance)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set plan_cache_mode = force_generic_plan")
        generic_us, generic_buffers = server_claim_cost(conn, instance)
    print(
        f"   claim_jobs(p_limit=1) in server, p50: {default_us:.0f} µs as is; {generic_us:.0f} µs with "
        f"plan_cache_mode = force_generic_plan ({generic_buffers} buffers)"
    )
    print("   EXPLAIN (ANALYZE, BUFFERS) of one claim_jobs(p_limit=1), via auto_explain:")
    durations = [float(m[1]) for note in notes if (m := re.search(r"duration: ([\d.]+) ms", note))]
    if len(durations) >= 2:
        # nested statements nest: the outer call's figure includes _end_expired's inner statement
        print(
            f"   (the call took {durations[-1]:.3f} ms in all; its statements' own execution is listed; "
            "the rest is planning and plpgsql)"
        )
    for note in notes:
        lines = note.splitlines()
        query, ms, buffers = note_summary(note)
        print(f"   - {query:<60} {ms:7.3f} ms  {buffers:5d} buffers")
        for i, ln in enumerate(lines):
            if SCAN.search(ln) and "(never" not in ln:
                node = re.sub(r"\s+\(cost=[^)]*\)", "", ln.strip().removeprefix("->  "))
                buf = ""
                for j in range(i + 1, min(i + 5, len(lines))):
                    if "Buffers:" in lines[j]:
                        buf = lines[j].strip()
                        break
                print(f"       {node[:100]}  [{buf or 'no buffers'}]")


def flat_test(args: argparse.Namespace) -> list[ClaimCost]:
    url = create_database(args.url, "bench_gpuq_flat")
    costs: list[ClaimCost] = []
    try:
        with connect(url, settings_for(url)) as mconn:
            migrate(mconn)
        client = Client.connect(url, settings_for(url))
        conn: psycopg.Connection[Any] = psycopg.connect(url, autocommit=True)
        instance = bench_instance(client, DRAIN_QUEUE)

        def measure(label: str) -> None:
            costs.append(measure_claims(client, conn, instance, label, args.singles, args.batches))

        sizes = [10**e for e in range(3, 7) if 10**e <= args.flat_max] or [args.flat_max]
        print(COST_HEADER)
        queued = 0
        for size in sizes:
            t0 = time.monotonic()
            insert_queued(conn, size - queued)
            queued = size
            conn.execute("vacuum analyze gpuq.jobs")
            print(f"   (filled to {size:,} queued and vacuumed in {time.monotonic() - t0:.1f} s)", flush=True)
            measure(f"{size:,} queued")

        # History: drive queued jobs to succeeded through claim_jobs/complete_jobs.
        t0 = time.monotonic()
        insert_queued(conn, args.history - queued)
        finished = drive_to_succeeded(conn, instance, args.history_seconds)
        print(
            f"   (drove {finished:,} jobs to succeeded through claim_jobs/complete_jobs in "
            f"{time.monotonic() - t0:.1f} s)",
            flush=True,
        )
        small = sizes[0]
        insert_queued(conn, small)
        measure(f"{small:,} q + {finished:,} done, no VACUUM")
        t0 = time.monotonic()
        conn.execute("vacuum analyze gpuq.jobs")
        conn.execute("vacuum analyze gpuq.job_events")
        print(f"   (vacuumed in {time.monotonic() - t0:.1f} s)", flush=True)
        measure(f"{small:,} q + {finished:,} done")
        big = sizes[-1]
        t0 = time.monotonic()
        insert_queued(conn, big - small)
        conn.execute("vacuum analyze gpuq.jobs")
        print(f"   (filled to {big:,} queued and vacuumed in {time.monotonic() - t0:.1f} s)", flush=True)
        measure(f"{big:,} q + {finished:,} done")
        explain_claim(url, instance)
        profile_batch(url, instance)
        client.close()
        conn.close()
    finally:
        drop_database(args.url, url)
    return costs


# --- the run ---------------------------------------------------------------------------------------


def goal(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=ADMIN_URL, help="admin URL of the server (creates/drops databases)")
    parser.add_argument("-n", type=int, default=20000, help="jobs to drain")
    parser.add_argument("-k", type=int, default=2, help="worker processes")
    parser.add_argument("--batch", type=int, default=50, help="claim batch size (PgQueuer: batch_size)")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--skip-flat", action="store_true", help="skip the claim-cost-vs-size part")
    parser.add_argument("--flat-max", type=int, default=10**6, help="largest queued count in the flat part")
    parser.add_argument("--history", type=int, default=10**6, help="finished jobs in the flat part's history")
    parser.add_argument("--history-seconds", type=float, default=240, help="time box for making that history")
    parser.add_argument("--singles", type=int, default=200, help="single claims timed per size")
    parser.add_argument("--batches", type=int, default=50, help="batch claims (p_limit=50) timed per size")
    parser.add_argument("--skip-psycopg", action="store_true", help="skip PgQueuer's psycopg driver")
    args = parser.parse_args()

    quiet_logs()
    started = time.monotonic()
    print(
        f"bench_queue: n={args.n} k={args.k} batch={args.batch} latency samples={args.latency_samples} "
        f"cpus={os.cpu_count()} python={sys.version.split()[0]}"
    )
    with psycopg.connect(args.url, autocommit=True) as conn:
        row = conn.execute(
            "select current_setting('server_version'), current_setting('shared_buffers')"
        ).fetchone()
        assert row is not None
        print(f"postgres {row[0]}, shared_buffers {row[1]}")
    import pgqueuer

    print(f"pgqueuer {pgqueuer.__version__}")

    gpuq_url = create_database(args.url, "bench_gpuq")
    pgq_url = create_database(args.url, "bench_pgq")
    drains: list[DrainResult] = []
    latencies: list[LatencyResult] = []
    costs: list[ClaimCost] = []
    try:
        with connect(gpuq_url, settings_for(gpuq_url)) as conn:
            migrate(conn)

        with part(f"drain {args.n} pre-queued no-op jobs"):
            print(f"   ({noise(gpuq_url)})")
            runs: list[Callable[[], DrainResult]] = [
                lambda: gpuq_drain(gpuq_url, args.n, args.k, args.batch),
                lambda: pgq_drain(pgq_url, args.n, args.k, 1, args.batch, "asyncpg"),
                # the shape of PgQueuer's tools/benchmark.py -s drain: one process, 5 consumers, batch 10
                lambda: pgq_drain(pgq_url, args.n, 1, 5, 10, "asyncpg"),
            ]
            if not args.skip_psycopg:
                runs.append(lambda: pgq_drain(pgq_url, args.n, args.k, 1, args.batch, "psycopg"))
            for run in runs:
                result = run()
                drains.append(result)
                print(
                    f"   {result.name:<46} {result.rate:8.0f} jobs/s  "
                    f"({result.seconds:.2f} s; {result.detail})",
                    flush=True,
                )

        with part(f"idle pickup latency, {args.latency_samples} samples {SPACING_S * 1000:.0f} ms apart"):
            print(f"   ({noise(gpuq_url)})")
            latencies.append(gpuq_latency(gpuq_url, args.latency_samples, args.batch))
            print(latencies[-1].row(), flush=True)
            drivers = ["asyncpg"] if args.skip_psycopg else ["asyncpg", "psycopg"]
            for driver in drivers:
                latencies.append(pgq_latency(pgq_url, args.latency_samples, args.batch, driver))
                print(latencies[-1].row(), flush=True)
    finally:
        drop_database(args.url, gpuq_url)
        drop_database(args.url, pgq_url)

    if not args.skip_flat:
        with part("gpuq claim cost vs table size"):
            print(f"   ({noise(args.url)})")
            costs = flat_test(args)

    print("\n== summary")
    gq = drains[0]
    best_pgq = max(drains[1:], key=lambda d: d.rate)
    for d in drains:
        ratio = "" if d is gq else f"   gpuq / this = {gq.rate / d.rate:5.2f}x"
        print(f"   drain  {d.name:<46} {d.rate:8.0f} jobs/s{ratio}")
    ratio = gq.rate / best_pgq.rate
    print(
        f"   goal: drain >= 3x PgQueuer's best ({best_pgq.rate:.0f} jobs/s): {ratio:.2f}x  {goal(ratio >= 3)}"
    )
    lat = latencies[0]
    for other in latencies[1:]:
        print(
            f"   pickup p50 gpuq {pct(lat.ms, 50):.2f} ms vs {other.name} {pct(other.ms, 50):.2f} ms "
            f"(gpuq / this = {pct(lat.ms, 50) / pct(other.ms, 50):.2f}x); "
            f"p95 {pct(lat.ms, 95):.2f} vs {pct(other.ms, 95):.2f} ms; from INSERT sent p50 "
            f"{pct(lat.parts[END_TO_END], 50):.2f} vs {pct(other.parts[END_TO_END], 50):.2f} ms"
        )
    p50 = pct(lat.ms, 50)
    print(f"   goal: pickup p50 <= 2 ms: {p50:.2f} ms  {goal(p50 <= 2.0)}")
    if costs:
        vacuumed = [c for c in costs if "no VACUUM" not in c.label]
        base = vacuumed[0]

        def spread(name: str, key: Callable[[ClaimCost], float]) -> float:
            """Largest table over smallest, and the worst over the best of all the tables."""
            worst, best = max(vacuumed, key=key), min(vacuumed, key=key)
            r = key(vacuumed[-1]) / key(base)
            print(
                f"   {name:<26} {key(base):8.0f} -> {key(vacuumed[-1]):8.0f}  largest/smallest {r:5.2f}x; "
                f"max/min {key(worst) / key(best):5.2f}x (max at {worst.label})"
            )
            return max(r, key(worst) / key(base))

        print(f"   over the {len(vacuumed)} vacuumed tables, from {base.label} to {vacuumed[-1].label}:")
        r_buf = spread("claim(1) buffers", lambda c: c.buffers)
        r_srv = spread("claim(1) server exec µs p50", lambda c: c.server_us)
        spread("claim(1) round trip µs p50", lambda c: pct(c.single_us, 50))
        spread("claim(50) round trip µs p50", lambda c: pct(c.batch_us, 50))
        flat = max(r_buf, r_srv) <= 1.5
        print(
            "   goal: claim cost flat (buffers and server time at every vacuumed size within 1.5x of the "
            f"smallest; round trips are shown but carry the machine's noise): {goal(flat)}"
        )
        for c in costs:
            if "no VACUUM" in c.label:
                print(
                    f"   before VACUUM ({c.label}): claim(1) {c.buffers} buffers, "
                    f"{c.server_us:.0f} µs in server = {c.buffers / base.buffers:.1f}x / "
                    f"{c.server_us / base.server_us:.1f}x the smallest table"
                )
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
