"""The local provider: real worker processes on this machine, driven by real ticks on real Postgres."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from PIL import Image

from gpuq.client import Client
from manager.config import from_dict
from manager.metrics import Metrics
from manager.providers.base import LaunchSpec, OfferFilter, ProviderError
from manager.providers.local import WORKER_COMMAND, LocalProvider, _proc_stat
from manager.tick import Manager, tick

PREFIX = "gpuq:test:"
SLEEPER = (sys.executable, "-c", "import time; time.sleep(60)")
STUBBORN = (
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    "time.sleep(60)",
)


def alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def spec(label: str = PREFIX + "demo") -> LaunchSpec:
    return LaunchSpec(label=label, image="-", disk_gb=0, onstart="")


def test_processes_are_listed_across_provider_objects_and_destroyed(tmp_path: Path) -> None:
    first = LocalProvider(tmp_path, command=SLEEPER, slots=2, grace_s=5)
    offers = first.search_offers(OfferFilter(interruptible=False, min_disk_gb=0))
    assert len(offers) == 2 and all(o.dph == 0 and not o.interruptible for o in offers)
    a = first.create(offers[0], spec())
    b = first.create(offers[1], spec("someone-else:x"))

    # A later tick is another process: it knows the workers only from the state file.
    later = LocalProvider(tmp_path, command=SLEEPER, slots=2, grace_s=5)
    assert [i.provider_id for i in later.list_instances(PREFIX)] == [a]
    assert later.search_offers(OfferFilter(interruptible=False, min_disk_gb=0)) == []  # both slots used
    pid = int(json.loads(later.state_file.read_text())[a]["pid"])
    later.destroy(a)
    wait_for(lambda: not alive(pid), 5, "the worker to exit")
    assert later.list_instances(PREFIX) == []
    first.destroy(b)
    assert first.list_instances("") == []


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    p = LocalProvider(tmp_path, command=STUBBORN, slots=1, grace_s=0.5)
    pid_name = p.create(p.search_offers(OfferFilter(interruptible=False, min_disk_gb=0))[0], spec())
    log = tmp_path / "logs" / f"{pid_name}.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(), 10, "the stubborn process to start")
    started = time.monotonic()
    p.destroy(pid_name)
    assert 0.5 <= time.monotonic() - started < 6
    assert p.list_instances("") == []


def test_a_dead_process_is_not_listed(tmp_path: Path) -> None:
    p = LocalProvider(tmp_path, command=(sys.executable, "-c", "pass"), slots=1)
    pid_name = p.create(p.search_offers(OfferFilter(interruptible=False, min_disk_gb=0))[0], spec())
    wait_for(lambda: p.list_instances(PREFIX) == [], 10, "the process to exit")
    assert pid_name not in p.state_file.read_text()


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "worker" / "cli.py").exists(), reason="no worker"
)
def test_end_to_end_jobs_enqueued_workers_started_jobs_done_idle_workers_stopped(
    client: Client, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUQ_DEPLOYMENT", "test")
    for name in ("GPUQ_DAILY_BUDGET", "GPUQ_MAX_TOTAL_DPH", "GPUQ_BUDGET_TZ", "GPUQ_MANAGER_PROVIDERS"):
        monkeypatch.delenv(name, raising=False)
    ms = from_dict(
        {
            "daily_budget": 1.0,
            "max_total_dph": 1.0,
            "cooldown_s": 0,
            "queues": {
                "demo": {
                    "provider": "local",
                    "backend": "imageops",
                    "max_instances": 2,
                    "target_jobs_per_instance": 2,
                    "idle_timeout_s": 1,
                }
            },
        }
    )
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(image)
    env = {
        "DATABASE_URL": db_url,
        "GPUQ_STORAGE_URL": str(tmp_path / "out"),
        "GPUQ_DATA_DIR": str(tmp_path / "data"),
        "GPUQ_INPUT_DIRS": str(tmp_path),
        "GPUQ_POLL_SECONDS": "0.2",
        "GPUQ_HEARTBEAT_SECONDS": "1",
    }

    def provider() -> LocalProvider:  # a fresh object per tick, as separate cron runs would have
        return LocalProvider(tmp_path / "local", env=env, command=WORKER_COMMAND, slots=2, grace_s=20)

    def run_tick() -> list[str]:
        lines: list[str] = []
        result = tick(Manager(client, ms, {"local": provider()}, Metrics(), echo=lines.append))
        assert not result.errors, result.errors
        return result.rented

    jobs = [client.enqueue("demo", {"image": str(image), "ops": [{"op": "invert"}]}) for _ in range(3)]
    rented = run_tick()
    assert len(rented) == 2  # 3 queued, 2 per instance
    state = provider().state_file.read_text()
    pids = [int(json.loads(state)[r.split(":", 1)[1]]["pid"]) for r in rented]

    def all_done() -> bool:
        return all(client.get(j).finished for j in jobs)

    try:
        wait_for(all_done, 90, "the local workers to finish the jobs")
        assert {client.get(j).status for j in jobs} == {"succeeded"}
        wait_for(
            lambda: (
                {r["status"] for r in client.call("select status from gpuq.manager_instances()")} == {"idle"}
            ),
            30,
            "the workers to report idle",
        )
        time.sleep(1.2)  # past the idle timeout
        assert run_tick() == []
        assert client.call("select * from gpuq.manager_instances()") == []
        ended = client.call("select status, end_reason from gpuq.instances order by id")
        assert [r["status"] for r in ended] == ["terminated", "terminated"]
        assert all("idle" in r["end_reason"] for r in ended)
        for pid in pids:
            assert not alive(pid)
        assert provider().list_instances(PREFIX) == []
    finally:
        for pid in pids:  # never leave a worker behind, whatever failed
            if alive(pid):
                os.killpg(pid, 9)


def test_a_damaged_list_of_embedded_users_does_not_stop_a_worker_starting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    users = data_dir / "pgdata" / ".handle_pids.json"
    users.parent.mkdir(parents=True)
    users.write_text("[12")  # a write cut short
    p = LocalProvider(tmp_path / "local", command=SLEEPER, slots=1, grace_s=1, embedded_data_dir=data_dir)
    pid_name = p.create(p.search_offers(OfferFilter(interruptible=False, min_disk_gb=0))[0], spec())
    try:
        pid = int(json.loads(p.state_file.read_text())[pid_name]["pid"])
        assert json.loads(users.read_text()) == [pid]  # rebuilt, and the worker counts as a user
    finally:
        p.destroy(pid_name)


def test_a_worker_that_cannot_share_the_embedded_server_is_not_left_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # no pgdata: its list of users cannot be written
    p = LocalProvider(tmp_path / "local", command=SLEEPER, slots=1, grace_s=1, embedded_data_dir=data_dir)
    with pytest.raises(ProviderError, match="cannot share the embedded Postgres"):
        p.create(p.search_offers(OfferFilter(interruptible=False, min_disk_gb=0))[0], spec())
    left = [c for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE]
    assert [c.cmdline() for c in left if c.cmdline() == list(SLEEPER)] == []
    assert p.list_instances("") == []
    assert json.loads(p.state_file.read_text()) == {}
