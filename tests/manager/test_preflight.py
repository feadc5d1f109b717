"""The manager's check at start of the login rented hosts get, against real Postgres roles: a member of
gpuq_worker and nothing more passes; the owner's login, a superuser, a role that bypasses RLS or may
create roles, one that also holds gpuq_app or gpuq_manager, or owns gpuq's objects, is refused."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from gpuq.client import Client
from gpuq.settings import Settings
from manager import cli as manager_cli
from manager.config import ManagerSettings, from_dict
from manager.preflight import check_before_renting, worker_login_problems
from tests.conftest import ADMIN_URL

PIN = "gpuq==0.1.0 --hash=sha256:" + "0" * 64


@pytest.fixture
def login(db_url: str) -> Iterator[Callable[[str], str]]:
    """make(options) -> the URL of a new login role made with those options; dropped afterwards."""
    made: list[str] = []

    def make(options: str) -> str:
        name = f"gpuq_t_{secrets.token_hex(4)}"
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"create role {name} login {options}")
        made.append(name)
        return make_conninfo(db_url, user=name)

    yield make
    for name in made:
        for url in (db_url, ADMIN_URL):  # what it owns in the test database; then the role itself
            with psycopg.connect(url, autocommit=True) as conn:
                if url == db_url:
                    conn.execute(f"drop owned by {name}")
                else:
                    conn.execute(f"drop role {name}")


def test_a_member_of_gpuq_worker_only_passes(login: Callable[[str], str], client: Client) -> None:
    assert worker_login_problems(login("in role gpuq_worker"), client) == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("superuser in role gpuq_worker", "it is SUPERUSER"),
        ("bypassrls in role gpuq_worker", "it is BYPASSRLS"),
        ("createrole in role gpuq_worker", "it is CREATEROLE"),
        ("createdb in role gpuq_worker", "it is CREATEDB"),
        ("in role gpuq_worker, gpuq_app", "it is also a member of gpuq_app"),
        ("in role gpuq_worker, gpuq_manager", "it is also a member of gpuq_manager"),
        ("", "it is not a member of gpuq_worker"),
        ("noinherit in role gpuq_worker", "it does not inherit gpuq_worker's privileges"),
    ],
)
def test_logins_that_can_do_more_than_a_worker_are_refused(
    login: Callable[[str], str], client: Client, options: str, problem: str
) -> None:
    assert problem in "; ".join(worker_login_problems(login(options), client))


def test_a_login_owning_gpuq_objects_is_refused(
    login: Callable[[str], str], client: Client, db_url: str
) -> None:
    url = login("in role gpuq_worker")
    name = psycopg.conninfo.conninfo_to_dict(url)["user"]
    table = f"gpuq.t_{secrets.token_hex(4)}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"create table {table} ()")
        conn.execute(f"alter table {table} owner to {name}")
    try:
        assert "it owns tables in schema gpuq" in worker_login_problems(url, client)
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"drop table {table}")


def test_the_managers_own_login_and_a_login_that_fails_are_refused(client: Client) -> None:
    own = worker_login_problems(client.url, client)
    assert "it is the manager's own role (DATABASE_URL)" in own
    wrong = make_conninfo(client.url, user="no_such_role_gpuq", password="pw-that-must-not-show")
    (problem,) = worker_login_problems(wrong, client)
    assert problem.startswith("cannot log in with it:") and "pw-that-must-not-show" not in problem


def vast_queue(monkeypatch: pytest.MonkeyPatch, worker_url: str | None) -> ManagerSettings:
    for name in ("GPUQ_WORKER_DATABASE_URL", "GPUQ_INSTALL_URL", "GPUQ_INSTALL_SHA256"):
        monkeypatch.delenv(name, raising=False)
    if worker_url:
        monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", worker_url)
    monkeypatch.setenv("GPUQ_INSTALL_SPEC", PIN)
    return from_dict({"queues": {"q": {"provider": "vast"}}})


def test_renting_needs_a_worker_login_of_its_own(
    monkeypatch: pytest.MonkeyPatch, client: Client, login: Callable[[str], str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", client.url)  # what used to be shipped to every host
    with pytest.raises(SystemExit, match="set GPUQ_WORKER_DATABASE_URL to a login in role gpuq_worker"):
        check_before_renting(vast_queue(monkeypatch, None), client)
    superuser = login("superuser in role gpuq_worker")
    with pytest.raises(SystemExit) as caught:
        check_before_renting(vast_queue(monkeypatch, superuser), client)
    message = str(caught.value)
    assert message.startswith("gpuq manager: GPUQ_WORKER_DATABASE_URL (") and "it is SUPERUSER" in message
    assert "\n" not in message
    check_before_renting(vast_queue(monkeypatch, login("in role gpuq_worker")), client)
    # local workers are processes on this machine: nothing to check, and they keep the manager's URL
    check_before_renting(from_dict({"queues": {"q": {"provider": "local"}}}), client)


def test_gpuq_manager_tick_stops_at_start_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, login: Callable[[str], str], tmp_path: Path
) -> None:
    config = tmp_path / "m.json"
    config.write_text('{"queues": {"q": {"provider": "vast"}}}')
    monkeypatch.setenv("GPUQ_MANAGER_CONFIG", str(config))
    monkeypatch.setenv("GPUQ_INSTALL_SPEC", PIN)
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", login("in role gpuq_worker, gpuq_app"))
    monkeypatch.setenv("VAST_API_KEY", "vk-never-used-0123456789")
    parser = argparse.ArgumentParser()
    manager_cli.add_arguments(parser)
    with pytest.raises(SystemExit, match="it is also a member of gpuq_app"):
        manager_cli.run(parser.parse_args(["tick", "--dry-run"]), settings)
