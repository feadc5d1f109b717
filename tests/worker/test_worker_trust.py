"""The worker as an instance: its secret (given, rotated, kept for a restart, refused once the instance
ends), and outcomes that survive a database outage. Real worker processes, real Postgres, real sockets."""

# The fixtures are test_worker's, imported by name, so the test parameters "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gpuq.client import Client, NotAuthorized
from tests.conftest import ADMIN_URL
from tests.worker.test_worker import (  # noqa: F401  (fixtures)
    WorkerProc,
    instance_row,
    make_png,
    start_worker,
    wait_for,
    wait_status,
)


class CuttingProxy:
    """Forwards a local port to Postgres. cut_after(marker, seconds): once a message from the client
    containing `marker` has been passed on, every connection is cut and new ones are refused for that
    long, so the server does the work and the client never hears the reply (a commit whose reply is lost).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.refuse_until = 0.0
        self.marker: bytes | None = None
        self.pause_s = 0.0
        self.cuts = 0
        self.deaf = False  # while set, nothing the server says reaches the client
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, marker: bytes, pause_s: float) -> None:
        self.marker, self.pause_s = marker, pause_s

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.marker is not None and self.marker in data:
                    self.marker = None
                    self.deaf = True
                    dst.sendall(data)
                    time.sleep(0.5)  # the server runs it and commits; its reply goes nowhere
                    self._cut()
                    self.deaf = False
                elif from_client or not self.deaf:
                    dst.sendall(data)
        except OSError:
            pass

    def _cut(self) -> None:
        self.cuts += 1
        self.refuse_until = time.monotonic() + self.pause_s
        with self.lock:
            socks, self.socks = self.socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._cut()


@pytest.fixture
def proxy(db_url: str) -> Iterator[CuttingProxy]:
    info = conninfo_to_dict(db_url)
    p = CuttingProxy((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    yield p
    p.close()


def test_a_complete_whose_reply_is_lost_is_kept_sent_again_and_recognised(
    start_worker: Callable[..., WorkerProc], client: Client, db_url: str, proxy: CuttingProxy, tmp_path: Path
) -> None:
    """The database commits the worker's complete and the reply never arrives, then the database stays
    away for a few seconds: the worker keeps the outcome on disk, sends it again once it can, and the
    database recognises it as this lease's own. The job ends succeeded, once, on its first attempt."""
    via_proxy = make_conninfo(db_url, host="127.0.0.1", port=str(proxy.port))
    w = start_worker(lease=30, DATABASE_URL=via_proxy)
    src = make_png(tmp_path / "in.png")
    proxy.cut_after(b"complete_job", pause_s=4.0)
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "invert"}]})
    wait_for(lambda: "kept on disk and sent again" in w.log, 20, "the outcome kept in the outbox")
    assert proxy.cuts == 1
    outbox = list((tmp_path / "data" / "worker").glob("outbox-*/*.json"))
    assert len(outbox) == 1 and outbox[0].name.startswith(f"{job_id}-")
    job = wait_status(client, job_id, "succeeded", timeout=30)
    assert job.attempt == 1 and job.result["outputs"][0]["name"] == "output.png"
    wait_for(lambda: f"job {job_id}: its kept complete is delivered (succeeded)" in w.log, 20, "delivery")
    assert not list((tmp_path / "data" / "worker").glob("outbox-*/*.json"))
    assert client.history(job_id)[-1]["event"] == "succeeded" and len(client.history(job_id)) == 1
    assert w.proc.poll() is None  # and it goes on working
    again = client.enqueue("demo", {"image": str(src), "ops": [{"op": "invert"}]})
    assert wait_status(client, again, "succeeded").attempt == 1


def test_the_worker_replaces_its_secret_and_a_restart_takes_up_the_same_instance(
    start_worker: Callable[..., WorkerProc], client: Client, tmp_path: Path
) -> None:
    w = start_worker()
    first = w.instance_id
    # the secret in the machine's environment (or EC2 user data) no longer works
    with pytest.raises(NotAuthorized):
        client.as_instance(w.secret).claim(None, 1)
    kept = list((tmp_path / "data" / "worker").glob("instance-*.json"))
    assert len(kept) == 1 and oct(kept[0].stat().st_mode & 0o777) == "0o600"
    assert w.secret not in kept[0].read_text()
    w.proc.kill()
    w.wait(10)
    again = start_worker(enrolled=False, GPUQ_INSTANCE_SECRET=w.secret)  # the same machine, restarted
    assert again.instance_id == first
    src = make_png(tmp_path / "in.png")
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "invert"}]})
    assert wait_status(client, job_id, "succeeded").instance_id == first
    again.signal(signal.SIGTERM)  # leaving for good: nothing of the instance is left on disk
    assert again.wait(30) == 0
    assert not list((tmp_path / "data" / "worker").iterdir())


def test_a_worker_whose_instance_ends_stops_and_ends_its_machine(
    start_worker: Callable[..., WorkerProc], client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "terminated"
    w = start_worker(
        lease=4, GPUQ_ORPHAN_TIMEOUT_SECONDS="3600", GPUQ_SELF_TERMINATE_CMD=f"echo ended > {marker}"
    )
    src = make_png(tmp_path / "in.png")
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 30}]})
    wait_status(client, job_id, "running")
    client.call("select gpuq.mark_failed(%s, 'destroyed by the manager')", (w.instance_id,))
    assert w.wait(20) == 0
    assert "its instance has ended" in w.log and marker.read_text() == "ended\n"
    job = client.get(job_id)
    assert job.status == "queued" and job.attempt == 1  # handed back by the manager, nothing reported after


def test_a_worker_with_no_secret_enrolls_itself_only_with_the_managers_rights(
    start_worker: Callable[..., WorkerProc], client: Client, db_url: str
) -> None:
    w = start_worker(enrolled=False)  # the owner's login (the embedded default is like this)
    row = instance_row(client, w)
    assert row["provider"] == "local" and row["queues"] == ["demo"] and row["label"] is None

    role = f"gpuq_test_host_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"create role {role} login in role gpuq_worker")
    try:
        host = start_worker(enrolled=False, wait_ready=False, DATABASE_URL=make_conninfo(db_url, user=role))
        assert host.wait(30) != 0
        assert (
            "GPUQ_INSTANCE_SECRET is not set, and this database login may not enroll an instance" in host.log
        )
        assert "Traceback" not in host.log
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"drop role {role}")


def test_a_worker_whose_rent_is_not_recorded_yet_waits_for_it(
    start_worker: Callable[..., WorkerProc], client: Client, tmp_path: Path
) -> None:
    """The manager creates the machine first and records its secret right after: the worker may ask
    before that. It waits (GPUQ_REGISTER_WAIT_SECONDS), then gives up with a clear message."""
    from gpuq.client import new_secret, secret_hash

    secret = new_secret()
    w = start_worker(enrolled=False, wait_ready=False, GPUQ_INSTANCE_SECRET=secret)
    wait_for(lambda: "this instance is not recorded yet" in w.log, 20, "the worker to wait")
    client.call(
        "select gpuq.record_rent('local', 'late-1', null, null, 'gpuq:test:demo', null, 1, 0, 0::numeric,"
        " false, array['demo'], 'test', 1, %s)",
        (secret_hash(secret),),
    )
    wait_for(lambda: "registered as instance" in w.log, 20, "the worker to register")
    with contextlib.suppress(Exception):
        w.proc.kill()
    late = start_worker(
        enrolled=False, wait_ready=False, GPUQ_INSTANCE_SECRET=new_secret(), GPUQ_REGISTER_WAIT_SECONDS="2"
    )
    assert late.wait(30) != 0
    assert "refuses this instance's secret" in late.log and "Traceback" not in late.log
