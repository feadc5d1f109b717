"""A worker holds one connection to Postgres, whatever it does: claims, heartbeats, progress, completions and
LISTEN share it. And it works through a transaction pooler (pgbouncer), where it polls instead of LISTEN."""

# The fixtures are test_worker's and test_pooler's, imported by name, so the parameters "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gpuq.client import Client
from tests.test_pooler import pooled_url  # noqa: F401  (fixture)
from tests.worker.test_worker import (  # noqa: F401  (fixtures)
    WorkerProc,
    make_png,
    start_worker,
    wait_for,
    wait_status,
)


def worker_sessions(client: Client) -> list[dict[str, object]]:
    return client.call(
        "select pid, state, query from pg_stat_activity"
        " where datname = current_database() and application_name = 'gpuq worker'"
    )


def test_a_busy_worker_holds_one_connection_and_wakes_on_notify(
    start_worker: Callable[..., WorkerProc], client: Client, tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    # polls only every 60 s: a job picked up sooner was woken by NOTIFY on that one connection
    w = start_worker("demo=imageops", GPUQ_CONCURRENCY="imageops=3", GPUQ_POLL_SECONDS="60", lease=6)
    time.sleep(0.5)
    enqueued = time.monotonic()
    first = client.enqueue("demo", {"image": str(src), "ops": [{"op": "invert"}]})
    wait_status(client, first, "succeeded", timeout=10)
    assert time.monotonic() - enqueued < 5
    jobs = [
        client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 3}, {"op": "invert"}]})
        for _ in range(3)
    ]
    for job in jobs:
        wait_status(client, job, "running")
    seen = set()
    end = time.monotonic() + 3  # three jobs running, heartbeats every 1.5 s, progress, LISTEN
    while time.monotonic() < end:
        sessions = worker_sessions(client)
        assert len(sessions) == 1, sessions
        seen.add(sessions[0]["pid"])
        time.sleep(0.1)
    for job in jobs:
        wait_status(client, job, "succeeded")
    assert len(seen) == 1 and w.proc.poll() is None


def test_a_worker_works_through_a_transaction_pooler_by_polling(
    start_worker: Callable[..., WorkerProc], client: Client, pooled_url: str, tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    w = start_worker(
        "demo=imageops",
        DATABASE_URL=pooled_url,
        GPUQ_TRANSACTION_POOLER="1",
        GPUQ_POLL_SECONDS="0.5",
        GPUQ_CONCURRENCY="imageops=2",
    )
    jobs = [
        client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 1}, {"op": "invert"}]})
        for _ in range(4)
    ]
    for job in jobs:
        done = wait_status(client, job, "succeeded", timeout=30)
        assert done.attempt == 1
    assert w.proc.poll() is None
