"""Through a real pgbouncer in transaction mode (like Supabase's pooler on port 6543): no LISTEN, no prepared
statements. The client degrades to polling and every operation still works."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gpuq.client import Client
from tests.conftest import make_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pooled_url(db_url: str) -> Iterator[str]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        pytest.fail("pgbouncer is not installed (Debian package pgbouncer; .ci/run installs it)")
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    port = free_port()
    # pgbouncer drops root for the postgres user, who cannot enter pytest's private tmp dirs
    tmp_path = Path(tempfile.mkdtemp(prefix="gpuq-pgbouncer-"))
    tmp_path.chmod(0o777)
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"gpuq = host={info.get('host', '127.0.0.1')} port={info.get('port', 5432)} dbname={info['dbname']} "
        f"user={info.get('user', 'postgres')}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\npool_mode = transaction\n"
        f"unix_socket_dir =\nlogfile = {tmp_path}/pgbouncer.log\npidfile = {tmp_path}/pgbouncer.pid\n"
        "max_client_conn = 50\ndefault_pool_size = 4\n"
    )
    ini.chmod(0o644)
    proc = subprocess.Popen([binary, "-u", "postgres", str(ini)], stderr=subprocess.DEVNULL)
    url = f"postgresql://postgres@127.0.0.1:{port}/gpuq"
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(url, prepare_threshold=None).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_everything_works_through_a_transaction_pooler(
    pooled_url: str, client: Client, tmp_path: Path
) -> None:
    settings = make_settings(pooled_url, tmp_path, transaction_pooler=True, poll_seconds=0.2)
    pooled = Client.connect(pooled_url, settings)
    other = Client.connect(pooled_url, settings)
    _, secret = pooled.enroll(["pool"], max_concurrency=20)
    instance = other.as_instance(secret)
    instance.register()
    ids = [pooled.enqueue("pool", {"n": n}) for n in range(20)]  # enough calls to pass any prepare threshold

    def work() -> None:
        time.sleep(0.3)
        for job in instance.claim(["pool"], 20):
            assert job.lease_token is not None
            instance.progress(job.id, job.lease_token, 50)
            instance.complete(job.id, job.lease_token, {"n": job.payload["n"]})

    thread = threading.Thread(target=work)
    thread.start()
    done = pooled.wait(ids[-1], timeout=20)  # polls: LISTEN cannot work through the pooler
    thread.join()
    assert done.status == "succeeded" and done.result == {"n": 19}
    assert all(pooled.get(i).status == "succeeded" for i in ids)
    assert pooled.as_instance(secret).heartbeat().lost == []
    pooled.close()
    other.close()
