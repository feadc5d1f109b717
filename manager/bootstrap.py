"""What a rented machine is started with: a small onstart stub and the environment it needs.

Vast takes at most 4048 characters of onstart, so the stub carries scripts/onstart.sh gzip+base64 and
unpacks it (or, when even that does not fit, fetches it from GPUQ_BOOTSTRAP_URL). The script itself
takes all its configuration from environment variables, passed as the instance's env.

What the host can see: a Vast host (and anyone with root on an EC2 instance) can read the container's
environment, its disk and its processes. So an instance gets only what its worker needs:
DATABASE_URL of the gpuq_worker role (it may claim, heartbeat and complete jobs, nothing more), and the
storage credentials named in GPUQ_WORKER_ENV (scope them to the output bucket). The provider API key,
the manager's own database role and anything else in the manager's environment never leave it.
"""

from __future__ import annotations

import base64
import gzip
import os
import shlex
from pathlib import Path

from manager.config import ManagerSettings
from manager.providers.base import LaunchSpec, Offer

ONSTART_MAX = 4048
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "onstart.sh"

_STUB = """#!/bin/bash
# gpuq: unpack the bootstrap (scripts/onstart.sh) and run it; safe to run again.
W="${{GPUQ_WORKSPACE:-/workspace}}/gpuq"; mkdir -p "$W"
echo '{payload}' | base64 -d | gunzip > "$W/onstart.sh"
exec bash "$W/onstart.sh" >> "$W/onstart.log" 2>&1
"""

_FETCH_STUB = """#!/bin/bash
# gpuq: fetch the bootstrap (scripts/onstart.sh) and run it; safe to run again.
W="${{GPUQ_WORKSPACE:-/workspace}}/gpuq"; mkdir -p "$W"
curl -fsSL --retry 5 {url} -o "$W/onstart.sh" || wget -qO "$W/onstart.sh" {url}
exec bash "$W/onstart.sh" >> "$W/onstart.log" 2>&1
"""


def onstart_stub(script: str | None = None, bootstrap_url: str | None = None) -> str:
    """The onstart command: the packed script, or a fetch of bootstrap_url when that is too long."""
    text = SCRIPT.read_text() if script is None else script
    payload = base64.b64encode(gzip.compress(text.encode(), compresslevel=9, mtime=0)).decode()
    stub = _STUB.format(payload=payload)
    if len(stub) <= ONSTART_MAX:
        return stub
    if bootstrap_url:
        return _FETCH_STUB.format(url=shlex.quote(bootstrap_url))
    raise ValueError(
        f"the packed bootstrap is {len(stub)} characters, over Vast's {ONSTART_MAX}; "
        "shorten scripts/onstart.sh or set GPUQ_BOOTSTRAP_URL"
    )


def instance_env(ms: ManagerSettings, queue: str, provider: str) -> dict[str, str]:
    """The environment of an instance serving `queue` (everything the bootstrap and worker read)."""
    launch = ms.launch[queue]
    env = {
        "GPUQ_QUEUES": f"{queue}={launch.backend}",  # the worker's queue=backend form
        "GPUQ_BACKENDS": launch.backend,  # what the bootstrap installs
        "GPUQ_CONCURRENCY": f"{launch.backend}={launch.concurrency}",  # as record_rent tells the database
        "GPUQ_PROVIDER": provider,
        "GPUQ_INSTALL_SPEC": ms.install_spec,
    }
    if launch.workflows:
        env["GPUQ_WORKFLOWS"] = ",".join(launch.workflows)
    if ms.worker_database_url:
        env["DATABASE_URL"] = ms.worker_database_url
    if ms.storage_url:
        env["GPUQ_STORAGE_URL"] = ms.storage_url
    if ms.orphan_timeout_s and provider != "local":
        env["GPUQ_ORPHAN_TIMEOUT_SECONDS"] = f"{ms.orphan_timeout_s:g}"  # onstart sets how it ends itself
    for name in ms.worker_env_names:
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(launch.env)
    return env


def launch_spec(ms: ManagerSettings, queue: str, offer: Offer) -> LaunchSpec:
    launch = ms.launch[queue]
    return LaunchSpec(
        label=ms.label(queue),
        image=launch.image,
        disk_gb=launch.disk_gb,
        onstart=onstart_stub(bootstrap_url=ms.bootstrap_url),
        env=instance_env(ms, queue, offer.provider),
        # An interruptible offer is rented at the bid the policy priced it at, never on-demand silently.
        # a bid is the GPU price alone (storage bills on top); providers without one bid the whole price
        bid_price=(offer.bid if offer.bid is not None else offer.dph) if offer.interruptible else None,
    )
