"""Migrations from empty, twice, from two processes at once; and who may touch what afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gpuq.db import connect
from gpuq.migrate import Migration, MigrationError, load_migrations, migrate
from tests.conftest import ADMIN_URL, create_database, drop_database, make_settings


@pytest.fixture
def empty_db() -> Iterator[str]:
    url = create_database("gpuq_migrate")
    yield url
    drop_database(url)


def test_from_empty_then_again_is_a_no_op(empty_db: str) -> None:
    with connect(empty_db, make_settings(empty_db)) as conn:
        first = migrate(conn)
        assert [m.version for m in first] == [m.version for m in load_migrations()]
        assert migrate(conn) == []
        rows = conn.execute("select version from gpuq.schema_migrations order by version").fetchall()
        assert [r["version"] for r in rows] == [m.version for m in first]


def test_two_migrators_at_once_both_succeed_and_apply_once(empty_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db, "PYTHONPATH": str(Path(__file__).parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpuq.cli", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    applied = [out.count("applied ") for out, _ in results]
    assert sorted(applied) == [0, 0, len(load_migrations())]  # exactly one of them did the work


def test_an_applied_migration_that_changed_is_an_error(empty_db: str) -> None:
    with connect(empty_db, make_settings(empty_db)) as conn:
        migrate(conn)
        edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in load_migrations()]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            migrate(conn, edited)


def as_role(url: str, role: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"set role {role}")
        conn.execute(sql)


@pytest.fixture(scope="module")
def supabase_like_db() -> Iterator[str]:
    """A database on a cluster that has Supabase's API roles, migrated after they exist."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        for role in ("anon", "authenticated"):
            conn.execute(
                f"do $$ begin create role {role} nologin; exception when duplicate_object then null; end $$"
            )
    url = create_database("gpuq_roles")
    with connect(url, make_settings(url)) as conn:
        migrate(conn)
        conn.execute("select gpuq.enqueue('q', '{}')")
    yield url
    drop_database(url)


@pytest.mark.parametrize(
    "sql",
    [
        "select * from gpuq.jobs",
        "insert into gpuq.jobs (queue) values ('q')",
        "select gpuq.enqueue('q', '{}')",
        "select * from gpuq.claim_jobs('gpuqi_0123456789abcdef', '{q}', 1)",
        "select * from gpuq.queue_stats()",
        "select * from gpuq.instances",
        "select * from gpuq.manager_instances()",
        "select * from gpuq.spend_by_day('UTC')",
        "select * from gpuq.avoided_machines",
        "select * from gpuq.manager_ticks",
        "select gpuq.manager_silence_seconds('gpuqi_0123456789abcdef')",
        "select * from gpuq.config",
    ],
)
@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_supabase_api_roles_reach_nothing(supabase_like_db: str, role: str, sql: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(supabase_like_db, role, sql)


def test_worker_role_runs_worker_functions_only(supabase_like_db: str) -> None:
    # it may call them, and without an instance's secret they refuse it (GQ401), not the privilege system
    for sql in (
        "select * from gpuq.claim_jobs('gpuqi_0123456789abcdef', '{q}', 1)",
        "select * from gpuq.heartbeat('gpuqi_0123456789abcdef')",
        "select gpuq.manager_silence_seconds('gpuqi_0123456789abcdef')",
    ):
        with pytest.raises(psycopg.Error) as refused:
            as_role(supabase_like_db, "gpuq_worker", sql)
        assert refused.value.sqlstate == "GQ401"
    for sql in (
        "select gpuq.record_tick()",  # a worker must not make a dead manager look alive
        "select * from gpuq.manager_ticks",
        "select * from gpuq.jobs",
        "select gpuq.enqueue('q', '{}')",
        "select gpuq.cancel_job(1)",
        "select gpuq.prune_jobs()",
        "update gpuq.jobs set status = 'succeeded'",
        "select gpuq.drain_instance(1, 'x')",  # the manager's: a worker drains only itself
        "select gpuq.release_instance_jobs(1)",
        "select gpuq.enroll_instance(sha256('x'), '{q}')",
        "select * from gpuq.config",
        "update gpuq.config set retry_base_seconds = 3600",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(supabase_like_db, "gpuq_worker", sql)


def test_manager_role_runs_manager_functions_only(supabase_like_db: str) -> None:
    as_role(supabase_like_db, "gpuq_manager", "select * from gpuq.manager_instances()")
    as_role(supabase_like_db, "gpuq_manager", "select gpuq.reap_expired()")
    as_role(supabase_like_db, "gpuq_manager", "select * from gpuq.spend_by_day('UTC')")
    as_role(supabase_like_db, "gpuq_manager", "select gpuq.record_tick()")
    for sql in (
        "select * from gpuq.jobs",
        "select * from gpuq.instances",
        "select gpuq.enqueue('q', '{}')",
        "select * from gpuq.claim_jobs('gpuqi_0123456789abcdef', '{q}', 1)",
        "select gpuq.prune_jobs()",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(supabase_like_db, "gpuq_manager", sql)


def test_app_role_enqueues_and_reads_but_cannot_rewrite_state(supabase_like_db: str) -> None:
    as_role(supabase_like_db, "gpuq_app", "insert into gpuq.jobs (queue, payload) values ('q', '{\"a\": 1}')")
    as_role(supabase_like_db, "gpuq_app", "select gpuq.enqueue('q', '{}')")
    as_role(supabase_like_db, "gpuq_app", "select id, status, result from gpuq.jobs")
    for sql in (
        "update gpuq.jobs set status = 'succeeded'",
        "delete from gpuq.jobs",
        "insert into gpuq.jobs (queue, status) values ('q', 'succeeded')",
        "select * from gpuq.claim_jobs('gpuqi_0123456789abcdef', '{q}', 1)",
        "select gpuq.enroll_instance(sha256('x'), '{q}')",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(supabase_like_db, "gpuq_app", sql)
