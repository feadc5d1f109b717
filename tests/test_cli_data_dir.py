"""Which database `gpuq` talks to does not depend on the folder it runs from: one per-user data directory
(or GPUQ_DATA_DIR), printed by --version and migrate; an existing ./.gpuq is still used, with a notice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def gpuq(*args: str, home: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPUQ_") and k not in ("XDG_DATA_HOME", "XDG_RUNTIME_DIR")
    }
    return subprocess.run(
        [sys.executable, "-m", "gpuq.cli", *args],
        env={**base, "PYTHONPATH": str(ROOT), "HOME": str(home), "DATABASE_URL": "", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_same_database_from_any_folder_in_the_per_user_data_directory(tmp_path: Path) -> None:
    home, here, there = tmp_path / "home", tmp_path / "here", tmp_path / "there"
    for d in (home, here, there):
        d.mkdir()
    expected = home / ".local" / "share" / "gpuq"

    version = gpuq("--version", home=home, cwd=there)
    assert version.returncode == 0, version.stderr
    assert f"data directory {expected} (the per-user default)" in version.stdout
    assert f"database embedded Postgres under {expected / 'pgdata'}" in version.stdout

    submitted = gpuq("submit", "demo", '{"n": 1}', home=home, cwd=here)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    # XDG_RUNTIME_DIR is unset here (cron, containers): platformdirs' warning about it is not shown
    assert submitted.stderr == "", submitted.stderr

    listed = gpuq("list", "--queue", "demo", home=home, cwd=there)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[0] == job_id  # the job submitted from the other folder
    assert (expected / "pgdata" / "PG_VERSION").exists()
    assert not (here / ".gpuq").exists() and not (there / ".gpuq").exists()

    migrated = gpuq("migrate", home=home, cwd=there)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.splitlines()[0] == f"data directory {expected} (the per-user default)"


def test_gpuq_data_dir_wins_and_an_existing_dot_gpuq_is_used_with_a_notice(tmp_path: Path) -> None:
    home, old = tmp_path / "home", tmp_path / "old-project"
    home.mkdir()
    (old / ".gpuq").mkdir(parents=True)

    chosen = gpuq("--version", home=home, cwd=old, GPUQ_DATA_DIR=str(tmp_path / "mine"))
    assert f"data directory {tmp_path / 'mine'} (GPUQ_DATA_DIR)" in chosen.stdout

    version = gpuq("--version", home=home, cwd=old)
    assert f"data directory {old / '.gpuq'} (./.gpuq in this folder)" in version.stdout
    listed = gpuq("list", home=home, cwd=old)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr.splitlines() == [
        f"gpuq: using {old / '.gpuq'} (./.gpuq in this folder); set GPUQ_DATA_DIR to choose"
    ]
    assert (old / ".gpuq" / "pgdata" / "PG_VERSION").exists()
