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

from gpuq.client import Client
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


@pytest.fixture
def client(db_url: str, settings: Settings) -> Iterator[Client]:
    """A client on a database emptied for this test."""
    c = Client.connect(db_url, settings)
    c.conn.execute(
        "truncate gpuq.jobs, gpuq.job_events, gpuq.instances, gpuq.instance_events restart identity cascade"
    )
    yield c
    c.close()


@pytest.fixture
def instance(client: Client) -> int:
    return client.register_instance("manual", None, gpu_name="Test GPU", vram_mb=24000, queues=["q"])


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's AWS server (S3, EC2) on a free loopback port, one per test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
