"""Tests run against a real Postgres: a fresh database per test run on the server at GPUQ_TEST_ADMIN_URL
(default: the local server on 127.0.0.1:5432), migrated with gpuq's own migrations."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from moto.server import ThreadedMotoServer
from psycopg.conninfo import make_conninfo

from gpuq.client import Client, InstanceClient
from gpuq.db import connect
from gpuq.migrate import migrate
from gpuq.settings import Settings

ADMIN_URL = os.environ.get("GPUQ_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def make_settings(url: str | None, data_dir: Path | None = None, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": url,
        "data_dir": data_dir or Path(".gpuq").resolve(),
        "transaction_pooler": False,
        "lease_seconds": 60,
        "poll_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def create_database(prefix: str = "gpuq_test") -> str:
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return make_conninfo(ADMIN_URL, dbname=name)


def drop_database(url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def db_url() -> Iterator[str]:
    url = create_database()
    with connect(url, make_settings(url)) as conn:
        migrate(conn)
    yield url
    drop_database(url)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


# gpuq.config for tests: leases down to 1 s (production's floor is 10 s; tests that check it set it).
TEST_CONFIG = "delete from gpuq.config; insert into gpuq.config (min_lease_seconds) values (1)"


@pytest.fixture
def client(db_url: str, settings: Settings) -> Iterator[Client]:
    """A client (the database owner) on a database emptied for this test."""
    c = Client.connect(db_url, settings)
    c.conn.execute(
        "truncate gpuq.jobs, gpuq.job_events, gpuq.instances, gpuq.instance_events restart identity cascade"
    )
    c.conn.execute(TEST_CONFIG)
    yield c
    c.close()


def enroll(
    client: Client,
    queues: tuple[str, ...] = ("q",),
    *,
    concurrency: int = 100,
    vram_mb: int = 24000,
    gpu_name: str | None = "Test GPU",
    provider: str = "manual",
) -> InstanceClient:
    """A new instance, as `gpuq enroll` makes one, and the worker API acting as it."""
    instance_id, secret = client.enroll(
        queues, max_concurrency=concurrency, vram_mb=vram_mb, gpu_name=gpu_name, provider=provider
    )
    return client.as_instance(secret, instance_id)


@pytest.fixture
def instance(client: Client) -> InstanceClient:
    """An enrolled instance serving queue q, 24 GB of VRAM, up to 100 jobs at once."""
    return enroll(client)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's AWS server (S3, EC2) on a free loopback port, one per test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def worker_login(db_url: str) -> Iterator[str]:
    """A login role in gpuq_worker, as a rented host gets it; its database URL."""
    role = f"gpuq_test_host_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"create role {role} login in role gpuq_worker")
    yield make_conninfo(db_url, user=role)
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"drop role {role}")
