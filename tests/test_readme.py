"""The README's SQL and shell examples, run as written: the SQL against a freshly migrated database, the shell
blocks made only of gpuq commands through the real `gpuq` on the embedded default. The examples stay true."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuq.db import connect
from gpuq.migrate import migrate
from tests.conftest import create_database, drop_database, make_settings

README = Path(__file__).resolve().parent.parent / "README.md"
SQL_BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
SH_BLOCKS = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
# Shell lines a test can run here as written: gpuq commands (with GPUQ_ settings), making a picture, ending
# a background job. Blocks with anything else (installs, a real DATABASE_URL, ComfyUI) are not walked.
RUNNABLE = re.compile(r"(GPUQ_\w+=\S+ )*gpuq |python3 -c |kill %\d")


@pytest.fixture(scope="module")
def readme_db() -> Iterator[str]:
    url = create_database("gpuq_readme")
    with connect(url, make_settings(url)) as conn:
        migrate(conn)
        # The examples read job 42: make it exist, finished, with a little history.
        conn.execute(
            "insert into gpuq.jobs (id, queue, payload) overriding system value values (42, 'tts', '{}')"
        )
        conn.execute("select gpuq.cancel_job(42)")
        conn.commit()
    yield url
    drop_database(url)


def test_the_readme_has_sql_examples() -> None:
    assert len(SQL_BLOCKS) >= 2
    assert any("insert into gpuq.jobs" in b for b in SQL_BLOCKS)
    assert any("gpuq.queue_stats()" in b for b in SQL_BLOCKS)


@pytest.mark.parametrize("block", SQL_BLOCKS, ids=lambda b: b.split("\n", 1)[0][:40])
def test_readme_sql_runs_as_written(readme_db: str, block: str) -> None:
    with connect(readme_db, make_settings(readme_db)) as conn:
        if "insert into gpuq.jobs" in block:
            conn.execute("set local role gpuq_app")  # what apps run, with the grants apps get
        for statement in (s.strip() for s in _statements(block)):
            conn.execute(statement)  # raises on any error: a wrong name, argument, type or grant
        conn.rollback()


def _statements(block: str) -> list[str]:
    """Split on semicolons that end a line; drop comment-only pieces."""
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [s for s in re.split(r";\s*(?:--[^\n]*)?\n", code + "\n") if s.strip()]


def _command_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


WALKED = [b for b in SH_BLOCKS if all(RUNNABLE.match(line) for line in _command_lines(b))]


def test_the_readme_has_shell_examples_to_walk() -> None:
    assert any("pictures=imageops" in b for b in WALKED)  # the first hour's walkthrough
    assert any("gpuq manager tick --dry-run" in b for b in WALKED)


@pytest.mark.parametrize("block", WALKED, ids=lambda b: _command_lines(b)[0][:40])
def test_readme_shell_runs_as_written(tmp_path: Path, block: str) -> None:
    """Each walked block in bash -e, in an empty folder, with `gpuq` and `python3` this checkout's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, command in (
        ("gpuq", f'{sys.executable} -m gpuq.cli "$@"'),
        ("python3", f'{sys.executable} "$@"'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\nexec {command}\n")
        (bin_dir / name).chmod(0o755)
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(README.parent),
        HOME=str(tmp_path),
        DATABASE_URL="",
        GPUQ_DATA_DIR=str(data_dir),
    )
    done = subprocess.run(
        ["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if "gpuq list --queue pictures --json" in block:
        listed = json.loads(done.stdout[done.stdout.rindex("\n[\n") :])
        assert [j["status"] for j in listed] == ["succeeded"], listed
        assert Path(listed[0]["result"]["outputs"][0]["url"].removeprefix("file://")).exists()
    # Nothing the block started outlives it: the worker drained, the embedded Postgres stopped.
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    deadline = time.monotonic() + 60
    while pidfile.exists():
        assert time.monotonic() < deadline, "the embedded Postgres still runs after the example"
        time.sleep(0.2)
