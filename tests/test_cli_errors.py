"""A user's mistakes through the real `gpuq` command: one line on stderr in the user's terms, no traceback,
and the exit code the README's table gives (0 done, 1 not achieved, 2 bad usage or input, 3 unreachable)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuq.client import Client

ROOT = Path(__file__).parent.parent


def gpuq(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuq.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["submit", "q", "{}", "--max-attempts", "0"], "gpuq: --max-attempts must be between 1 and 100"),
        (
            ["submit", "q", "{}", "--timeout", "0"],
            "gpuq: --timeout (in seconds) must be between 1 and 604800",
        ),
        (["submit", "q", "{}", "--min-vram-mb", "-1"], "gpuq: --min-vram-mb must be between 0 and 1048576"),
        (["submit", "q", "{}", "--key="], "gpuq: --key must be 1 to 200 characters"),
        (["submit", "q", "@no/such/payload.json"], "gpuq: cannot read the payload file no/such/payload.json"),
        (
            ["submit", "q", "{}", "--delay=-5m"],
            "gpuq submit: argument --delay: must not be negative, got '-5m'",
        ),
        (["submit", "q", "{}", "--delay", "-5m"], "gpuq submit: argument --delay: must not be negative"),
        (["prune", "--older-than", "-1d"], "gpuq prune: argument --older-than: must not be negative"),
        (["stats", "--tz", "Mars/Olympus"], "gpuq stats: argument --tz: unknown time zone 'Mars/Olympus'"),
        (["list", "--limit", "0"], "gpuq: --limit must be at least 1, got 0"),
        (["manager", "status", "--days", "0"], "gpuq: --days must be at least 1, got 0"),
        (["manager", "simulate", "--", "--help"], "gpuq: --help came after `--`, so it was read as a trace"),
        (["show", "987654"], "gpuq: job 987654 does not exist"),
        (["submit"], "gpuq submit: the following arguments are required: queue"),
    ],
)
def test_bad_input_is_one_line_naming_what_to_change_and_exit_2(
    client: Client, args: list[str], says: str
) -> None:
    line = one_line_error(gpuq(*args, env={"DATABASE_URL": client.url}), 2)
    assert line.startswith(says), line
    assert "constraint" not in line and "p_" not in line
    assert client.list_jobs() == []  # nothing was enqueued by a refused submit


def test_cancel_of_a_finished_job_exits_1_and_changes_nothing(client: Client) -> None:
    env = {"DATABASE_URL": client.url}
    job_id = client.enqueue("ops", {})
    assert gpuq("cancel", str(job_id), env=env).returncode == 0
    again = one_line_error(gpuq("cancel", str(job_id), env=env), 1)
    assert again == f"gpuq: job {job_id} already cancelled; nothing to cancel"
    assert client.get(job_id).status == "cancelled"


def test_a_wait_that_runs_out_is_one_line_and_exit_1_and_the_job_goes_on(client: Client) -> None:
    done = gpuq("submit", "nobody", "{}", "--wait", "--wait-timeout", "1s", env={"DATABASE_URL": client.url})
    job_id = int(done.stdout.splitlines()[0])
    line = one_line_error(done, 1)
    assert line.startswith(f"gpuq: job {job_id} is still queued after --wait-timeout 1 s")
    assert client.get(job_id).status == "queued"


def test_waiting_on_a_job_that_does_not_succeed_exits_1(client: Client) -> None:
    waiting = subprocess.Popen(
        [sys.executable, "-m", "gpuq.cli", "submit", "ops", "{}", "--wait"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": client.url, "GPUQ_POLL_SECONDS": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stdout is not None
    job_id = int(waiting.stdout.readline())
    client.cancel(job_id)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1, (out, err)
    assert f"job {job_id} [ops] cancelled" in out


def test_an_unreachable_database_is_exit_3() -> None:
    url = "postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=2"
    line = one_line_error(gpuq("list", env={"DATABASE_URL": url}), 3)
    assert line.startswith("gpuq: cannot reach the database:")
    tick = one_line_error(gpuq("manager", "tick", env={"DATABASE_URL": url}), 3)
    assert tick.startswith("gpuq: cannot reach the database:")


def test_a_bad_setting_is_one_line_and_exit_2(client: Client) -> None:
    line = one_line_error(gpuq("list", env={"DATABASE_URL": client.url, "GPUQ_LEASE_SECONDS": "x"}), 2)
    assert line == "gpuq: GPUQ_LEASE_SECONDS must be a whole number, got 'x'"


def test_help_texts_say_what_the_options_and_subcommands_do() -> None:
    listed = gpuq("list", "--help", env={}).stdout
    assert "only this queue's jobs" in listed and "at most this many jobs" in listed
    for sub in ("tick", "run", "status"):
        shown = gpuq("manager", sub, "--help", env={}).stdout
        description = shown.split("\n\n")[1]
        assert len(description) > 60, shown  # a paragraph, not just the usage line
    worker = gpuq("worker", "--help", env={}).stdout
    for backend in ("comfyui", "imageops", "f5tts"):
        assert backend in worker


def test_ctrl_c_while_waiting_is_one_line_and_exit_130(client: Client) -> None:
    waiting = subprocess.Popen(
        [sys.executable, "-m", "gpuq.cli", "submit", "ops", "{}", "--wait"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": client.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stdout is not None
    job_id = int(waiting.stdout.readline())
    time.sleep(0.5)  # into the wait
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130, err
    assert err == "gpuq: interrupted\n"
    assert client.get(job_id).status == "queued"  # the job goes on
