"""Worker processes on this machine: the embedded default and the demo. $0/h.

On the embedded default each worker is a user of the embedded Postgres (gpuq.db.share_embedded): the
server outlives the `gpuq manager tick` that started the worker, and stops when the last user exits.

"Renting" starts a worker process; the processes are recorded in a state file under the data dir so a
`gpuq manager tick` from cron sees the workers an earlier tick started. Destroy is SIGTERM to the
worker's process group (it drains and hands its jobs back), then SIGKILL after a grace.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuq.db import share_embedded
from manager.providers.base import (
    LaunchSpec,
    Offer,
    OfferFilter,
    ProviderError,
    ProviderInstance,
    ProviderStatus,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# The worker's command line: `gpuq worker` with this interpreter, so it runs in the same environment.
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "gpuq.cli", "worker")


class LocalProvider:
    name = "local"

    def __init__(
        self,
        state_dir: Path,
        *,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = WORKER_COMMAND,
        slots: int = 2,
        grace_s: float = 20.0,
        vram_mb: int = 0,
        embedded_data_dir: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_file = self.state_dir / "local_workers.json"
        self.env = dict(env or {})  # DATABASE_URL etc. for every worker
        self.command = tuple(command)
        self.slots = slots
        self.grace_s = grace_s
        self.vram_mb = vram_mb
        # The manager's embedded Postgres lives under this data dir (None: a real DATABASE_URL). Workers
        # join that server rather than being handed its socket, so it runs while any of them does.
        self.embedded_data_dir = embedded_data_dir
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started here: reaped here

    # ------------------------------------------------------------------ state file
    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The state file, read and written under an exclusive lock (a tick and a `run` may overlap)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "local_workers.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
            except ValueError:
                log.warning("local: %s is unreadable; starting from an empty record", self.state_file)
                state = {}
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                tmp = self.state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                tmp.replace(self.state_file)

    def _alive(self, entry: dict[str, Any]) -> bool:
        pid = int(entry["pid"])
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return False
        stat = _proc_stat(pid)
        # The start time guards against a recycled pid; a zombie has exited.
        return stat is not None and stat[1] == entry.get("start_ticks") and stat[0] != "Z"

    # ------------------------------------------------------------------ Provider
    def search_offers(self, filters: OfferFilter) -> list[Offer]:
        with self._state() as state:
            used = sum(1 for e in state.values() if self._alive(e))
        free_gb = shutil.disk_usage(self.state_dir if self.state_dir.exists() else Path.cwd()).free / 1e9
        return [
            Offer(
                provider=self.name,
                offer_id=f"local-slot-{n}",
                gpu_name="local",
                num_gpus=1,
                vram_mb=self.vram_mb,
                dph=0.0,
                interruptible=False,
                verified=True,
                reliability=1.0,
                disk_gb=free_gb,
            )
            for n in range(max(0, self.slots - used))
        ]

    def create(self, offer: Offer, spec: LaunchSpec) -> str:
        if offer.provider != self.name:
            raise ProviderError(f"offer {offer.offer_id} is from {offer.provider}, not local")
        pid_name = f"local-{uuid.uuid4().hex[:10]}"
        log_dir = self.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env, **self.env}
        env.update(
            GPUQ_PROVIDER=self.name,
            GPUQ_PROVIDER_INSTANCE_ID=pid_name,
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        )
        if self.embedded_data_dir is not None:
            # Set empty, not removed: a .env the worker reads must not point it at another database.
            env["DATABASE_URL"] = ""
            env["GPUQ_DATA_DIR"] = str(self.embedded_data_dir)
        with open(log_dir / f"{pid_name}.log", "ab") as out:
            try:
                proc = subprocess.Popen(
                    list(self.command),
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: destroy signals the whole worker
                )
            except OSError as e:
                raise ProviderError(f"local: cannot start the worker: {e}") from None
        self._children[proc.pid] = proc
        stat = _proc_stat(proc.pid)
        with self._state() as state:
            state[pid_name] = {
                "pid": proc.pid,
                "start_ticks": stat[1] if stat else None,
                "label": spec.label,
                "offer_id": offer.offer_id,
                "started_at": time.time(),
            }
        if self.embedded_data_dir is not None:
            try:
                share_embedded(self.embedded_data_dir, proc.pid)
            except Exception as e:
                # Not counted as a user, the worker could lose the server under it: stop it now.
                _signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                self._children.pop(proc.pid, None)
                self._forget(pid_name)
                raise ProviderError(f"local: cannot share the embedded Postgres with the worker: {e}") from e
        log.info("local: started worker %s (pid %s)", pid_name, proc.pid)
        return pid_name

    def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        found = []
        with self._state() as state:
            for pid_name, entry in list(state.items()):
                if not self._alive(entry):
                    del state[pid_name]  # exited: no longer ours to list
                    continue
                if not str(entry.get("label", "")).startswith(label_prefix):
                    continue
                found.append(
                    ProviderInstance(
                        provider=self.name,
                        provider_id=pid_name,
                        label=entry["label"],
                        status=ProviderStatus.RUNNING,
                        raw_status=f"pid {entry['pid']}",
                        dph=0.0,
                        machine_id=None,
                        gpu_name="local",
                        started_at=datetime.fromtimestamp(entry["started_at"], UTC),
                    )
                )
        return found

    def destroy(self, provider_id: str) -> None:
        with self._state() as state:
            entry = state.get(provider_id)
        if entry is None or not self._alive(entry):
            self._forget(provider_id)
            return
        pid = int(entry["pid"])
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and self._alive(entry):
            time.sleep(0.05)
        if self._alive(entry):
            log.warning("local: worker %s ignored SIGTERM for %.0f s; killing it", provider_id, self.grace_s)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._alive(entry):
                time.sleep(0.05)
        child = self._children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        if not self._alive(entry):
            self._forget(provider_id)

    def _forget(self, provider_id: str) -> None:
        with self._state() as state:
            state.pop(provider_id, None)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the worker leads its own group (start_new_session)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return rest[0], int(rest[19])
