"""`gpuq demo` as a newcomer runs it: embedded Postgres, local storage, local workers started and stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageChops

ROOT = Path(__file__).parent.parent


def test_demo_runs_jobs_from_insert_to_output_files_and_stops_the_workers(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "", "GPUQ_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "gpuq.cli", "demo", "--jobs", "4", "--idle-timeout", "3s"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "insert into gpuq.jobs (queue, payload) values ('demo'" in done.stdout
    outputs = re.findall(r"job (\d+) succeeded: file://(\S+)", done.stdout)
    assert len(outputs) == 4
    assert "the manager stopped the idle workers" in done.stdout
    assert done.stdout.splitlines()[0] == f"data directory {tmp_path / 'data'} (GPUQ_DATA_DIR)"
    # the wait for the idle timeout is announced, not silent
    assert "all 4 jobs finished; the manager stops the workers once they have been idle for 3 s" in (
        done.stdout
    )
    assert "Traceback" not in done.stderr
    assert re.search(r"watch it live: http://127\.0\.0\.1:\d+/", done.stdout)  # the dashboard, while it runs
    assert "started worker" in done.stderr  # workers were started on demand

    # job 1 inverts input-0: the output is exactly its negative
    first = Path(dict(outputs)["1"])
    original = Image.open(tmp_path / "data" / "demo-inputs" / "input-0.png").convert("RGB")
    assert (
        ImageChops.difference(ImageChops.invert(original), Image.open(first).convert("RGB")).getbbox() is None
    )

    # no worker process outlives the demo
    state = tmp_path / "data" / "local" / "local_workers.json"
    assert not state.exists() or state.read_text().strip() in ("{}", "")
