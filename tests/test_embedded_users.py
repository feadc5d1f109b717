"""The embedded Postgres' list of users (pgserver's pgdata/.handle_pids.json), kept by real gpuq processes:
one lock whatever XDG_RUNTIME_DIR says, a recycled pid not taken for a user, a damaged list rebuilt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli_manager import gpuq, server_pid, wait_for_server_to_stop

ROOT = Path(__file__).parent.parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_") and k != "XDG_RUNTIME_DIR"}
    env.update(DATABASE_URL="", PYTHONPATH=str(ROOT), GPUQ_DATA_DIR=str(tmp_path / "data"))
    return env


def python(code: str, env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, **kw
    )


def join_and_share(env: dict[str, str], pid: int) -> None:
    """A process (like a tick) joins the server, counts `pid` as a user too (like a local worker it
    started), and exits."""
    code = (
        "from gpuq.settings import Settings; from gpuq.db import embedded_url, share_embedded\n"
        f"s = Settings.from_env(); embedded_url(s); share_embedded(s.data_dir, {pid})"
    )
    done = python(code, env)
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 0, out


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def test_processes_with_and_without_xdg_runtime_dir_take_the_same_lock(tmp_path: Path) -> None:
    """pgserver's own lock file lives under XDG_RUNTIME_DIR: a cron tick (unset) and a shell (set) took
    different ones, and updated the list of users unguarded. Now a process that holds the lock with the
    variable set keeps one without it from joining until it lets go."""
    env = embedded_env(tmp_path)
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    released = tmp_path / "released"
    holder = python(
        "import time; from pathlib import Path; from gpuq.db import _embedded_lock, embedded_pgdata\n"
        f"with _embedded_lock(embedded_pgdata(Path({str(tmp_path / 'data')!r}))):\n"
        "    print('held', flush=True); time.sleep(3)\n"
        f"    Path({str(released)!r}).write_text(repr(time.time()))",
        {**env, "XDG_RUNTIME_DIR": str(runtime)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        joiner = python(
            "import time; from gpuq.settings import Settings; from gpuq.db import embedded_url\n"
            "embedded_url(Settings.from_env()); print(repr(time.time()), flush=True)",
            env,
        )
        out, _ = joiner.communicate(timeout=120)
        assert joiner.returncode == 0, out
        assert holder.wait(timeout=30) == 0
        # pgserver took the same lock to join: it got in only once the holder had let go.
        assert float(out.strip()) >= float(released.read_text())
    finally:
        if holder.poll() is None:
            stop(holder)
    wait_for_server_to_stop(tmp_path / "data", 30)


@pytest.mark.skipif(not os.access(NS_LAST_PID, os.W_OK), reason="needs root to choose the next pid")
def test_a_killed_workers_pid_taken_by_another_process_does_not_keep_the_server_running(
    tmp_path: Path,
) -> None:
    env = embedded_env(tmp_path)
    data_dir = tmp_path / "data"
    worker = subprocess.Popen(SLEEPER)
    join_and_share(env, worker.pid)
    assert server_pid(data_dir) is not None  # the "worker" holds it
    worker.send_signal(signal.SIGKILL)  # no chance to leave the list
    worker.wait(timeout=10)

    # The system gives the dead worker's pid to a new process, started well after it (in life the pids
    # wrap round first; here, more than the 1.5 s start times may differ by for the same process).
    time.sleep(3)
    stranger = None
    for _ in range(50):
        NS_LAST_PID.write_text(str(worker.pid - 1))
        candidate = subprocess.Popen(SLEEPER)
        if candidate.pid == worker.pid:
            stranger = candidate
            break
        stop(candidate)
    if stranger is None:
        pytest.skip("could not get the pid back")
    try:
        assert json.loads((data_dir / "pgdata" / ".handle_pids.json").read_text()) == [worker.pid]
        listed = gpuq("list", env=env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        # The stranger is not the user recorded under that pid: the command was the last user.
        wait_for_server_to_stop(data_dir, 30)
    finally:
        stop(stranger)
        left = server_pid(data_dir)
        if left is not None:  # the test failed: do not leave the server behind
            os.kill(left, signal.SIGTERM)


def test_a_damaged_list_of_users_is_rebuilt_not_fatal(tmp_path: Path) -> None:
    env = embedded_env(tmp_path)
    data_dir = tmp_path / "data"
    worker = subprocess.Popen(SLEEPER)
    try:
        join_and_share(env, worker.pid)
        users = data_dir / "pgdata" / ".handle_pids.json"
        users.write_text("[12")  # a write cut short
        listed = gpuq("list", env=env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert "is unreadable; rebuilding it" in listed.stderr
        assert json.loads(users.read_text()) == [worker.pid]  # the worker still counts
        assert server_pid(data_dir) is not None
    finally:
        stop(worker)
    listed = gpuq("list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    wait_for_server_to_stop(data_dir, 30)
