"""The onstart stub and scripts/onstart.sh: size, secrets, and a re-run that starts nothing twice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manager.bootstrap import ONSTART_MAX, SCRIPT, instance_env, launch_spec, onstart_stub
from manager.config import from_dict
from manager.providers.base import LaunchSpec, Offer, OfferFilter
from manager.providers.vast import VastProvider
from tests.manager.conftest import VAST_KEY
from tests.manager.test_config import F5TTS_PINNED
from tests.standins.vast_server import VastStandin

# Stands in for python3 (and the venv's python): makes the venv, records pip, runs "the worker".
FAKE_PYTHON = """#!/bin/bash
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0 ;;
  "-m pip") echo "pip ${*:3}" >> "$FAKE_LOG"; exit 0 ;;
esac
echo "run $*" >> "$FAKE_LOG"
if [ -n "${GPUQ_SELF_TERMINATE_CMD:-}" ]; then echo "terminate: $GPUQ_SELF_TERMINATE_CMD" >> "$FAKE_LOG"; fi
exec sleep 30
"""


def test_the_stub_fits_vasts_limit_and_unpacks_the_script_verbatim(tmp_path: Path) -> None:
    stub = onstart_stub()
    assert len(stub) <= ONSTART_MAX
    # Run the stub's unpacking with the final exec replaced by a copy-out.
    unpack_only = stub.replace('exec bash "$W/onstart.sh"', 'cp "$W/onstart.sh" "$GPUQ_WORKSPACE/copy.sh" #')
    subprocess.run(
        ["bash", "-c", unpack_only], env={**os.environ, "GPUQ_WORKSPACE": str(tmp_path)}, check=True
    )
    assert (tmp_path / "copy.sh").read_text() == SCRIPT.read_text()


def test_a_script_too_big_to_pack_is_fetched_or_refused() -> None:
    big = "".join(f"echo {os.urandom(16).hex()}\n" for _ in range(400))  # does not compress
    with pytest.raises(ValueError, match="4048"):
        onstart_stub(big)
    fetch = onstart_stub(big, bootstrap_url="https://example.com/onstart.sh")
    assert "curl -fsSL" in fetch and len(fetch) < 1000


PIN = "gpuq==0.1.0 --hash=sha256:" + "ab" * 32  # a pinned release: no upload needed to build an env


def test_instances_get_the_worker_role_and_named_credentials_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://manager:secret@db/app")
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", "postgresql://gpuq_worker:w@db/app")
    monkeypatch.setenv("GPUQ_WORKER_ENV", "SUPABASE_URL")
    monkeypatch.setenv("SUPABASE_URL", "https://proj.supabase.co")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMANAGER000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "manager-secret-access-key-0123456789abcdef")
    monkeypatch.setenv("VAST_API_KEY", "vast-key-0123456789abcdef")
    monkeypatch.setenv("GPUQ_STORAGE_URL", "s3://bucket/out")
    monkeypatch.setenv("GPUQ_INSTALL_SPEC", PIN)
    # the queue's own, worker-scoped keys: other values than the manager's
    worker_keys = {
        "AWS_ACCESS_KEY_ID": "AKIAWORKER0000000001",
        "AWS_SECRET_ACCESS_KEY": "worker-only-secret-0",
        **F5TTS_PINNED,
    }
    ms = from_dict({"queues": {"tts": {"provider": "vast", "backend": "f5tts", "env": worker_keys}}})
    env = instance_env(ms, "tts", "vast")
    assert env["DATABASE_URL"] == "postgresql://gpuq_worker:w@db/app"
    assert env["GPUQ_QUEUES"] == "tts=f5tts" and env["GPUQ_STORAGE_URL"] == "s3://bucket/out"
    assert env["SUPABASE_URL"] == "https://proj.supabase.co" and env["GPUQ_INSTALL_SPEC"] == PIN
    assert env["AWS_SECRET_ACCESS_KEY"] == "worker-only-secret-0"
    for secret in ("vast-key", "manager:secret", "AKIAMANAGER", "manager-secret-access-key"):
        assert secret not in str(env)
    assert env["GPUQ_ORPHAN_TIMEOUT_SECONDS"] == "3600"  # a rented machine ends itself if orphaned
    local = instance_env(ms, "tts", "local")
    assert "GPUQ_ORPHAN_TIMEOUT_SECONDS" not in local  # processes bill nothing
    assert "DATABASE_URL" not in local and "GPUQ_INSTALL_SPEC" not in local  # the local provider's own
    offer = Offer("vast", "1", "RTX 4090", 1, 24000, 0.3, interruptible=True, min_bid=0.25)
    spec = launch_spec(ms, "tts", offer)
    assert spec.bid_price == 0.3 and spec.label == "gpuq:default:tts"  # a bid, never a silent on-demand
    assert all(len(v) <= 256 for v in spec.env.values())


def run_onstart(workspace: Path, bin_dir: Path, fake_log: Path, **extra: str) -> subprocess.Popen[bytes]:
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(workspace),
        "GPUQ_WORKSPACE": str(workspace),
        "DATABASE_URL": "postgresql://gpuq_worker@db/app",
        "GPUQ_QUEUES": "demo=imageops",
        "GPUQ_BACKENDS": "imageops",
        "GPUQ_INSTALL_SPEC": PIN,
        "CONTAINER_ID": "4242",
        "FAKE_LOG": str(fake_log),
        **extra,
    }
    # Its own process group, so the test can stop everything it left running by that group's id.
    return subprocess.Popen(["bash", str(SCRIPT)], env=env, start_new_session=True)


def start_fake(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A PATH dir holding the fake python3, the workspace, and the fake's log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    return bin_dir, tmp_path / "ws", tmp_path / "fake.log"


def test_onstart_is_idempotent_a_rerun_starts_no_second_worker(tmp_path: Path) -> None:
    bin_dir, workspace, fake_log = start_fake(tmp_path)
    groups = []
    try:
        first = run_onstart(workspace, bin_dir, fake_log)
        groups.append(first.pid)
        assert first.wait(timeout=30) == 0
        pidfile = workspace / "gpuq" / "run" / "worker.pid"
        loop_pid = int(pidfile.read_text())
        deadline = time.monotonic() + 10
        while "run -m gpuq.cli worker" not in (fake_log.read_text() if fake_log.exists() else ""):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)

        second = run_onstart(workspace, bin_dir, fake_log)
        groups.append(second.pid)
        assert second.wait(timeout=30) == 0
        time.sleep(0.3)

        assert int(pidfile.read_text()) == loop_pid  # the same loop, still alive
        os.kill(loop_pid, 0)
        log = fake_log.read_text().splitlines()
        assert log.count("run -m gpuq.cli worker") == 1
        req = workspace / "gpuq" / "run" / "gpuq.req"
        assert [line for line in log if line.startswith("pip install")] == [
            f"pip install -q --no-deps --require-hashes -r {req}",  # the pinned file, hash checked
            "pip install -q gpuq==0.1.0",  # then its dependencies
        ]  # installed once: the venv remembers the pin
        assert req.read_text() == PIN + "\n"
        onstart_log = (workspace / "gpuq" / "worker.log").read_text()
        assert "postgresql://" not in onstart_log  # nothing echoes the environment

        # After the machine stops (outbid) the pid file is stale: a re-run starts the worker again.
        os.killpg(first.pid, signal.SIGKILL)
        groups.remove(first.pid)
        time.sleep(0.2)
        third = run_onstart(workspace, bin_dir, fake_log)
        groups.append(third.pid)
        assert third.wait(timeout=30) == 0
        assert int(pidfile.read_text()) != loop_pid
    finally:
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def terminate_cmd(tmp_path: Path, provider: str) -> str:
    """The GPUQ_SELF_TERMINATE_CMD onstart gives the worker on `provider`."""
    bin_dir, workspace, fake_log = start_fake(tmp_path)
    proc = run_onstart(
        workspace, bin_dir, fake_log, GPUQ_PROVIDER=provider, GPUQ_ORPHAN_TIMEOUT_SECONDS="3600"
    )
    try:
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while "terminate: " not in (fake_log.read_text() if fake_log.exists() else ""):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    (line,) = [x for x in fake_log.read_text().splitlines() if x.startswith("terminate: ")]
    return line.removeprefix("terminate: ")


def test_on_ec2_an_orphaned_worker_shuts_the_instance_down(tmp_path: Path) -> None:
    # aws_spot launches with InstanceInitiatedShutdownBehavior=terminate: a shutdown ends the billing.
    assert terminate_cmd(tmp_path, "aws_spot") == "shutdown -h now"


def test_on_vast_an_orphaned_worker_destroys_its_own_instance(
    tmp_path: Path, vast: VastProvider, standin: VastStandin
) -> None:
    cmd = terminate_cmd(tmp_path, "vast")
    vastai = tmp_path / "ws" / "gpuq" / "venv" / "bin" / "vastai"
    assert f"'{vastai}' destroy instance" in cmd
    # Run it as the worker would, with the real vastai CLI (only pointed at the stand-in) and the
    # container's own id and key. (That Vast lets CONTAINER_API_KEY, its per-instance key, destroy
    # its own instance is not checked here: the stand-in takes the account key.)
    cli = Path(sys.executable).parent / "vastai"
    vastai.write_text(f'#!/bin/sh\nexec "{cli}" "$@" --url "{standin.url}"\n')
    vastai.chmod(0o755)
    standin.add_offer()
    (offer,) = vast.search_offers(OfferFilter(gpu_names=("RTX 4090",)))
    iid = vast.create(offer, LaunchSpec("gpuq:test:q", "img", 50, "true", bid_price=offer.bid))
    env = {**os.environ, "CONTAINER_ID": iid, "CONTAINER_API_KEY": VAST_KEY}
    env.pop("VAST_API_KEY", None)
    done = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(iid) not in standin.live()
