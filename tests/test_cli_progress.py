"""Progress bars (elapsed time, ETA) on a terminal, plain lines through a pipe: `submit --wait` run in a
pseudo-terminal, as a person at a shell runs it."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpuq.client import Client
from tests.conftest import enroll

ROOT = Path(__file__).parent.parent


def run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run `gpuq ARGS` with its stdout on a pseudo-terminal; answers its exit code and what it showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuq.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", **env},
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=10), shown.decode(errors="replace")


def test_submit_wait_draws_a_bar_with_elapsed_time_and_eta_on_a_terminal(client: Client) -> None:
    instance = enroll(client, ("tty",))

    def work() -> None:
        while not (jobs := instance.claim(["tty"], 1)):
            time.sleep(0.05)
        token = jobs[0].lease_token
        assert token is not None
        instance.progress(jobs[0].id, token, 50, "halfway")
        time.sleep(1.0)
        instance.complete(jobs[0].id, token, {"outputs": []})

    thread = threading.Thread(target=work)
    thread.start()
    code, shown = run_in_terminal(
        ["submit", "tty", "{}", "--wait"], {"DATABASE_URL": client.url, "GPUQ_POLL_SECONDS": "0.2"}
    )
    thread.join()
    assert code == 0, shown
    assert "elapsed" in shown and "ETA" in shown
    assert "50%" in shown and "100%" in shown
    assert "\x1b[" in shown  # drawn in place on the terminal


def test_shell_completion_completes_commands_and_subcommands() -> None:
    """What bash's completion (`eval "$(register-python-argcomplete gpuq)"`) asks the command for."""

    def complete(line: str) -> set[str]:
        read, write = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuq.cli"],
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "_ARGCOMPLETE": "1",
                "_ARGCOMPLETE_IFS": " ",
                "COMP_LINE": line,
                "COMP_POINT": str(len(line)),
            },
            close_fds=False,  # else the fds 8 and 9 made below are closed after preexec_fn
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(write, 8), os.dup2(os.open(os.devnull, os.O_WRONLY), 9)),
        )
        os.close(write)
        with os.fdopen(read) as answer:
            words = set(answer.read().split())
        assert proc.wait(timeout=30) == 0
        return words

    assert complete("gpuq sub") == {"submit"}
    assert complete("gpuq manager st") == {"status"}
    assert {"--json", "--queue", "--limit", "--status"} <= complete("gpuq list --")
