"""The `gpuq` command, as a person runs it: against the test database, and on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpuq.client import Client
from tests.conftest import enroll

ROOT = Path(__file__).parent.parent


def gpuq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuq.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_command() -> None:
    out = gpuq("--help", env={}).stdout
    commands = (
        "migrate",
        "submit",
        "show",
        "list",
        "cancel",
        "retry",
        "stats",
        "prune",
        "worker",
        "manager",
        "demo",
    )
    for command in commands:
        assert command in out


def test_submit_wait_shows_progress_and_result(client: Client) -> None:
    env = {"DATABASE_URL": client.url, "GPUQ_POLL_SECONDS": "0.2"}
    instance = enroll(client, ("cli",))

    def work() -> None:
        while not (jobs := instance.claim(["cli"], 1)):
            time.sleep(0.05)
        token = jobs[0].lease_token
        assert token is not None
        instance.progress(jobs[0].id, token, 40, "denoising")
        time.sleep(0.5)
        instance.complete(jobs[0].id, token, {"outputs": ["file:///tmp/out.png"]})

    thread = threading.Thread(target=work)
    thread.start()
    done = gpuq("submit", "cli", '{"prompt": "a cat"}', "--wait", "--wait-timeout", "30s", env=env)
    thread.join()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    job_id = int(lines[0])
    assert any(f"job {job_id} [cli] running 40% denoising" in line for line in lines)
    assert any("succeeded" in line for line in lines)
    assert "\x1b[" not in done.stdout and "ETA" not in done.stdout  # through a pipe: lines, no bar
    assert json.loads("\n".join(lines[lines.index("{") :])) == {"outputs": ["file:///tmp/out.png"]}

    shown = gpuq("show", str(job_id), env=env)
    assert '"prompt": "a cat"' in shown.stdout and "succeeded" in shown.stdout


def test_bad_input_is_a_clear_error_and_exit_2(client: Client) -> None:
    env = {"DATABASE_URL": client.url}
    bad = gpuq("submit", "Bad Queue", "{}", env=env)
    assert bad.returncode == 2 and bad.stderr == "gpuq: the queue name must be a lowercase name\n"
    assert "Traceback" not in bad.stderr
    not_json = gpuq("submit", "q", "{oops", env=env)
    assert not_json.returncode != 0 and "not valid JSON" in not_json.stderr
    missing = gpuq("cancel", "987654", env=env)
    assert missing.returncode == 2 and "job 987654 does not exist" in missing.stderr
    assert client.list_jobs() == []


def test_cancel_retry_list_and_stats(client: Client) -> None:
    env = {"DATABASE_URL": client.url}
    job_id = client.enqueue("ops", {})
    assert "cancelled" in gpuq("cancel", str(job_id), env=env).stdout
    assert "queued again" in gpuq("retry", str(job_id), env=env).stdout
    assert client.get(job_id).status == "queued"
    listed = gpuq("list", "--queue", "ops", env=env).stdout
    assert str(job_id) in listed and "queued" in listed
    stats = gpuq("stats", env=env)
    assert stats.returncode == 0 and "ops" in stats.stdout


def test_unmigrated_database_says_to_migrate(tmp_path: Path) -> None:
    from tests.conftest import create_database, drop_database

    url = create_database("gpuq_cli_empty")
    try:
        out = gpuq("list", env={"DATABASE_URL": url})
        assert out.returncode != 0 and "run `gpuq migrate` first" in out.stderr
    finally:
        drop_database(url)


def test_embedded_postgres_is_the_default_without_database_url(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "", "GPUQ_DATA_DIR": str(tmp_path / "data")}
    submitted = gpuq("submit", "demo", '{"n": 1}', env=env, timeout=180)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    listed = gpuq("list", env=env, timeout=180)
    assert job_id in listed.stdout and "demo" in listed.stdout
    assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()


# A worker writes the text `gpuq show` and `submit --wait` print. Raw, this would retitle the terminal,
# clear the screen and hide the rest of the line (and U+202E reverse what follows).
HOSTILE = "boom\x1b]0;owned\x07\x1b[2J\x1b[8m hidden\x9b31m \u202eevil\r\nnext line"


def test_stored_text_is_printed_without_terminal_control_characters(client: Client) -> None:
    env = {"DATABASE_URL": client.url, "GPUQ_POLL_SECONDS": "0.2"}
    instance = enroll(client, ("cli",))

    def work() -> None:
        while not (jobs := instance.claim(["cli"], 1)):
            time.sleep(0.05)
        token = jobs[0].lease_token
        assert token is not None
        instance.progress(jobs[0].id, token, 40, HOSTILE)
        time.sleep(0.5)
        instance.fail(jobs[0].id, token, "INPUT_INVALID", HOSTILE)

    thread = threading.Thread(target=work)
    thread.start()
    waited = gpuq("submit", "cli", "{}", "--wait", "--wait-timeout", "30s", env=env)
    thread.join()
    assert waited.returncode == 1
    job_id = waited.stdout.splitlines()[0]
    shown = gpuq("show", job_id, env=env)
    assert shown.returncode == 0, shown.stderr
    for out in (waited.stdout, shown.stdout):
        assert not any(c in out for c in "\x1b\x07\x9b\u202e\r"), out
        assert "boom\\x1b]0;owned\\x07\\x1b[2J\\x1b[8m hidden\\x9b31m \\u202eevil\\r\\nnext line" in out
    assert "running 40% boom\\x1b" in waited.stdout  # the progress message too
    # a message spans one line of the history table, not two
    history = shown.stdout.split("history:")[1]
    assert [line for line in history.splitlines() if "next line" in line and "boom" not in line] == []


def test_read_commands_print_json_for_scripts(client: Client) -> None:
    env = {"DATABASE_URL": client.url}
    job_id = client.enqueue("ops", {"n": 1}, priority=5)
    listed = gpuq("list", "--queue", "ops", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["id"] == job_id and row["payload"] == {"n": 1} and row["priority"] == 5
    assert "lease_token" not in row
    shown = json.loads(gpuq("show", str(job_id), "--json", env=env).stdout)
    assert shown["status"] == "queued" and shown["payload"] == {"n": 1} and shown["history"] == []
    stats = json.loads(gpuq("stats", "--json", env=env).stdout)
    assert set(stats) == {"queues", "instances", "failures"}
    assert [q["queued"] for q in stats["queues"] if q["queue"] == "ops"] == [1]
    status = gpuq("manager", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["instances"] == []


def test_show_never_prints_a_running_jobs_lease_token(client: Client) -> None:
    env = {"DATABASE_URL": client.url}
    instance = enroll(client, ("held",))
    job_id = client.enqueue("held", {})
    (job,) = instance.claim(["held"], 1)
    assert job.lease_token
    for args in (("show", str(job_id)), ("show", str(job_id), "--json"), ("list", "--queue", "held")):
        shown = gpuq(*args, env=env)
        assert shown.returncode == 0, shown.stderr
        assert "running" in shown.stdout
        assert str(job.lease_token) not in shown.stdout and "lease_token" not in shown.stdout
