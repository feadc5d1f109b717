"""`gpuq manager tick` from cron and `gpuq manager run` on the embedded default (no DATABASE_URL), run as a
user runs them: separate processes, from a folder that is not the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).parent.parent


def embedded_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "manager.json"
    config.write_text(
        json.dumps(
            {
                "daily_budget": 1.0,
                "max_total_dph": 1.0,
                "cooldown_s": 0,
                "queues": {
                    "demo": {
                        "provider": "local",
                        "backend": "imageops",
                        "max_instances": 1,
                        "target_jobs_per_instance": 3,
                        "idle_timeout_s": 1,
                        "env": {"GPUQ_INPUT_DIRS": str(tmp_path)},
                    }
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
    env.update(
        DATABASE_URL="",
        PYTHONPATH=str(ROOT),
        GPUQ_DATA_DIR=str(tmp_path / "data"),
        GPUQ_MANAGER_CONFIG=str(config),
        GPUQ_STORAGE_URL=str(tmp_path / "out"),
        GPUQ_DEPLOYMENT="crontest",
        GPUQ_POLL_SECONDS="0.5",
        GPUQ_HEARTBEAT_SECONDS="1",
    )
    return env


def gpuq(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuq.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def server_pid(data_dir: Path) -> int | None:
    """The embedded Postgres' pid while it runs, else None."""
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    if not pidfile.exists():
        return None
    pid = int(pidfile.read_text().split()[0])
    return pid if psutil.pid_exists(pid) else None


def wait_for_server_to_stop(data_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server_pid(data_dir) is not None:
        assert time.monotonic() < deadline, "the embedded Postgres still runs with nothing using it"
        time.sleep(0.2)


def jobs(env: dict[str, str], cwd: Path) -> list[dict[str, object]]:
    listed = gpuq("list", "--queue", "demo", "--json", env=env, cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def submit_pictures(tmp_path: Path, env: dict[str, str], count: int) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(image)
    for _ in range(count):
        payload = json.dumps({"image": str(image), "ops": [{"op": "invert"}]})
        done = gpuq("submit", "demo", payload, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr


def test_cron_ticks_drain_the_queue_on_the_embedded_default_then_the_server_stops(
    tmp_path: Path,
) -> None:
    env = embedded_env(tmp_path)
    data_dir = tmp_path / "data"
    submit_pictures(tmp_path, env, 3)
    worker_pids: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while True:  # cron: one `gpuq manager tick` process after another
            ticked = gpuq("manager", "tick", env=env, cwd=tmp_path)
            assert ticked.returncode == 0, ticked.stdout + ticked.stderr
            state = data_dir / "local" / "local_workers.json"
            if state.exists():
                worker_pids |= {int(w["pid"]) for w in json.loads(state.read_text()).values()}
            listed = jobs(env, tmp_path)
            if all(j["status"] == "succeeded" for j in listed) and not any(
                psutil.pid_exists(p) for p in worker_pids
            ):
                break
            assert time.monotonic() < deadline, f"jobs not done, or workers not stopped: {listed}"
            time.sleep(1)
        assert len(listed) == 3
        assert worker_pids, "no tick started a worker"
        assert len(list((tmp_path / "out").rglob("*.png"))) == 3
        # The last worker is gone and the last tick ended: nothing uses the server any more.
        wait_for_server_to_stop(data_dir, 30)
    finally:
        for pid in worker_pids:
            if psutil.pid_exists(pid):
                os.killpg(pid, 9)


def test_manager_run_stops_its_local_workers_and_the_server_when_it_ends(tmp_path: Path) -> None:
    env = {**embedded_env(tmp_path), "GPUQ_MANAGER_TICK_SECONDS": "1"}
    data_dir = tmp_path / "data"
    # A long idle timeout: only the end of `run` stops this worker.
    config = json.loads(Path(env["GPUQ_MANAGER_CONFIG"]).read_text())
    config["queues"]["demo"]["idle_timeout_s"] = 3600
    Path(env["GPUQ_MANAGER_CONFIG"]).write_text(json.dumps(config))
    submit_pictures(tmp_path, env, 1)
    ran = gpuq("manager", "run", "--ticks", "8", env=env, cwd=tmp_path, timeout=150)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "run ends: stopping local worker" in ran.stderr
    state = json.loads((data_dir / "local" / "local_workers.json").read_text())
    assert state == {}
    shown = gpuq("manager", "status", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["instances"] == []  # recorded as ended, not left running
    wait_for_server_to_stop(data_dir, 30)


def test_a_killed_local_worker_does_not_keep_the_embedded_server_running(tmp_path: Path) -> None:
    env = embedded_env(tmp_path)
    data_dir = tmp_path / "data"
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(image)
    payload = json.dumps({"image": str(image), "ops": [{"op": "sleep", "seconds": 60}]})
    assert gpuq("submit", "demo", payload, env=env, cwd=tmp_path).returncode == 0
    ticked = gpuq("manager", "tick", env=env, cwd=tmp_path)
    assert ticked.returncode == 0, ticked.stderr
    state = json.loads((data_dir / "local" / "local_workers.json").read_text())
    (pid,) = [int(w["pid"]) for w in state.values()]
    users = data_dir / "pgdata" / ".handle_pids.json"
    assert json.loads(users.read_text()) == [pid]  # the tick has gone; its worker holds the server
    assert server_pid(data_dir) is not None
    os.killpg(pid, 9)  # no chance to leave the server's list of users
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The next command finds the dead user, drops it, and is the last: the server stops when it exits.
    listed = gpuq("list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    wait_for_server_to_stop(data_dir, 30)
