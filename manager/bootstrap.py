"""What a rented machine is started with: a small onstart stub, the environment it needs, the exact gpuq
it installs, and (run on the machine itself, once gpuq is installed) the model downloads.

Vast takes at most 4048 characters of onstart, so the stub carries scripts/onstart.sh gzip+base64 and
unpacks it (or, when even that does not fit, fetches it from GPUQ_BOOTSTRAP_URL). The script itself
takes all its configuration from environment variables, passed as the instance's env.

What the host can see: a Vast host (and anyone with root on an EC2 instance) can read the container's
environment, its disk and its processes. So an instance gets only what its worker needs: the
GPUQ_WORKER_DATABASE_URL login (a member of gpuq_worker and nothing more; checked at start by
manager/preflight.py), and the variables GPUQ_WORKER_ENV and the queue's `env` name. Nothing that carries a
manager secret (the provider API key, DATABASE_URL, a service-role key, the manager's AWS keys) is ever
passed: `instance_env` refuses it (manager.config.check_host_env).

What the host runs: exactly the gpuq the manager runs. By default the manager builds its own wheel
(manager/wheel.py), puts it in GPUQ_INSTALL_STORAGE_URL (default GPUQ_STORAGE_URL) under a public URL, and
passes that URL and the wheel's sha256; onstart checks the hash before pip sees the file. Or
GPUQ_INSTALL_URL + GPUQ_INSTALL_SHA256 (a wheel served elsewhere), or GPUQ_INSTALL_SPEC, a release pinned
with --hash. Never a bare name: `gpuq` on PyPI is another project. Models a workflow's binding names are
pinned by sha256 too, and checked as they are downloaded (`python -m manager.bootstrap models`).

scripts/onstart.sh reads, all from the instance's env: DATABASE_URL and GPUQ_QUEUES (required);
GPUQ_PROVIDER; GPUQ_PROVIDER_INSTANCE_ID (default: $CONTAINER_ID on Vast, the instance id from IMDS on EC2);
GPUQ_BACKENDS (comfyui: ComfyUI through comfy-cli, release GPUQ_COMFYUI_VERSION, default latest stable);
GPUQ_WORKFLOWS and GPUQ_WORKFLOWS_DIR (whose bindings' models are downloaded; default the installed
workflows/); GPUQ_INSTALL_URL with GPUQ_INSTALL_SHA256, or GPUQ_INSTALL_SPEC; GPUQ_WORKSPACE (/workspace:
everything goes under $GPUQ_WORKSPACE/gpuq); GPUQ_PYTHON (python3, for the venv); GPUQ_WORKER_CMD (default
<venv>/bin/python -m gpuq.cli worker); GPUQ_ORPHAN_TIMEOUT_SECONDS and GPUQ_SELF_TERMINATE_CMD (the
worker's orphan check). GPUQ_STORAGE_URL is the worker's; its storage credentials are its instance's own,
from the database (GPUQ_STORAGE_CREDENTIALS=instance, manager/credentials.py), where the manager issues them.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from manager import credentials
from manager.config import ManagerSettings, check_host_env
from manager.providers.base import LaunchSpec, Offer, ProviderError
from worker import workflows
from worker.backends.model_files import sha256_of

log = logging.getLogger("gpuq.bootstrap")

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


class LaunchRefused(ProviderError):
    """A launch refused before anything is rented: a host would get a manager secret, no login of its
    own, or no gpuq it can install exactly."""


NO_WORKER_LOGIN = (
    "rented hosts need a database login of their own: set GPUQ_WORKER_DATABASE_URL to a login in role "
    "gpuq_worker (create role NAME login password '…' in role gpuq_worker); the manager never sends its "
    "own DATABASE_URL"
)


def instance_env(ms: ManagerSettings, queue: str, provider: str) -> dict[str, str]:
    """The environment of an instance serving `queue` (everything the bootstrap and worker read).

    For a rented host (any provider but local) it carries the worker's own login and how to install
    this gpuq, and never a manager secret: raises LaunchRefused instead."""
    launch = ms.launch[queue]
    rented = provider != "local"  # local workers are processes here: the provider gives them their env
    env = {
        "GPUQ_QUEUES": f"{queue}={launch.backend}",  # the worker's queue=backend form
        "GPUQ_BACKENDS": launch.backend,  # what the bootstrap installs
        "GPUQ_CONCURRENCY": f"{launch.backend}={launch.concurrency}",  # as record_rent tells the database
        "GPUQ_PROVIDER": provider,
    }
    if launch.workflows:
        env["GPUQ_WORKFLOWS"] = ",".join(launch.workflows)
    if rented:
        if not ms.worker_database_url:
            raise LaunchRefused(NO_WORKER_LOGIN)
        env["DATABASE_URL"] = ms.worker_database_url
        env.update(install_env(ms))
        env.update(credentials.host_env(ms))  # storage credentials of its own, from the database
    if ms.storage_url:
        env["GPUQ_STORAGE_URL"] = ms.storage_url
    if ms.orphan_timeout_s and rented:
        env["GPUQ_ORPHAN_TIMEOUT_SECONDS"] = f"{ms.orphan_timeout_s:g}"  # onstart sets how it ends itself
    for name in ms.worker_env_names:
        if os.environ.get(name):
            env[name] = os.environ[name]
    if rented and "DATABASE_URL" in launch.env:
        raise LaunchRefused(
            f"queues.{queue}.env sets DATABASE_URL; rented hosts get GPUQ_WORKER_DATABASE_URL"
        )
    env.update(launch.env)
    if rented:
        try:
            check_host_env(env)
        except ValueError as e:
            raise LaunchRefused(str(e)) from None
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


# --- the gpuq a rented host installs ------------------------------------------------------------------

NO_INSTALL_SOURCE = (
    "rented hosts must install exactly this gpuq: set GPUQ_INSTALL_STORAGE_URL (or GPUQ_STORAGE_URL) to an "
    "s3:// or supabase:// location with public URLs (?public=true, or s3's public_base_url=), where the "
    "manager puts its wheel; or GPUQ_INSTALL_URL and GPUQ_INSTALL_SHA256; or GPUQ_INSTALL_SPEC pinned "
    "with --hash"
)
_served: dict[tuple[str, str], str] = {}  # (storage or wheel URL, sha256) -> the URL a host fetches


def install_env(ms: ManagerSettings, *, resolve: bool = True) -> dict[str, str]:
    """The variables onstart installs gpuq from; raises LaunchRefused. With `resolve` (a rent), the first
    call in a process puts the manager's wheel in storage, or checks that the configured URL serves the
    configured hash, and later calls reuse the answer; without (the check at start, which a cron tick
    runs every minute), only the settings are checked, and nothing is sent or fetched."""
    if ms.install_spec:
        return {"GPUQ_INSTALL_SPEC": ms.install_spec}
    if ms.install_url and ms.install_sha256:
        url = _check_served(ms.install_url, ms.install_sha256) if resolve else ms.install_url
        return {"GPUQ_INSTALL_URL": url, "GPUQ_INSTALL_SHA256": ms.install_sha256}
    storage_url = ms.install_storage_url or ms.storage_url
    if not storage_url or urlsplit(storage_url).scheme not in ("s3", "supabase"):
        raise LaunchRefused(NO_INSTALL_SOURCE)
    if not resolve:
        return {}
    url, sha = publish_wheel(storage_url)
    return {"GPUQ_INSTALL_URL": url, "GPUQ_INSTALL_SHA256": sha}


def publish_wheel(storage_url: str) -> tuple[str, str]:
    """Put the wheel of the running gpuq under gpuq-install/<sha256>/ in `storage_url`; answer its public
    URL and sha256. The URL must be public and unsigned: a host fetches the wheel before it holds any
    credential, a presigned S3 URL carries the manager's access key id (and session token), and a signed
    URL does not fit in Vast's 256-character env values."""
    from manager.wheel import build_wheel
    from worker.errors import JobError
    from worker.storage import storage_from_url

    with tempfile.TemporaryDirectory(prefix="gpuq-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        if (storage_url, wheel.sha256) in _served:
            return _served[storage_url, wheel.sha256], wheel.sha256
        try:
            storage = storage_from_url(storage_url)
            url = storage.put(f"gpuq-install/{wheel.sha256}/{wheel.name}", wheel.path, "application/zip")
        except (ValueError, JobError) as e:
            raise LaunchRefused(f"cannot put the gpuq wheel in {storage_url}: {e}") from None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.query:
        raise LaunchRefused(
            f"{storage_url} gives signed URLs; rented hosts fetch the gpuq wheel before they hold any "
            "credential, so its URL must be public: add ?public=true (or s3's public_base_url=)"
        )
    _served[storage_url, wheel.sha256] = _check_served(url, wheel.sha256)
    log.info("rented hosts install gpuq from %s (sha256 %s)", url, wheel.sha256)
    return url, wheel.sha256


def _check_served(url: str, sha256: str) -> str:
    """`url`, once it is seen to serve a file with this sha256 (what the host will check too)."""
    if (url, sha256) in _served:
        return url
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                digest.update(chunk)
    except requests.RequestException as e:
        raise LaunchRefused(
            f"cannot fetch the gpuq wheel at {url} as a host would, with no credential: {e}"
        ) from None
    if digest.hexdigest() != sha256:
        raise LaunchRefused(f"{url} serves a file with sha256 {digest.hexdigest()}, not {sha256}")
    _served[url, sha256] = url
    return url


# --- models, pinned by sha256 ------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PinnedModel:
    name: str
    path: str  # relative to the ComfyUI directory: models/<folder>/<name>
    url: str
    sha256: str | None  # None: not pinned, and so never downloaded


def workflow_models(name: str, directory: Path = workflows.DEFAULT_DIR) -> list[PinnedModel]:
    """The models workflow `name` needs, each with the sha256 its binding pins (the binding's "sha256",
    64 lowercase hex digits). Raises JobError for an unknown or invalid workflow."""
    wf = workflows.load_workflow(name, directory)  # checks the paths stay under models/
    raw = json.loads((directory / f"{name}.binding.json").read_text())
    pins = {m.get("name"): m.get("sha256") for m in raw.get("models", []) if isinstance(m, dict)}
    found = []
    for m in wf.models:
        pin = pins.get(m.name)
        found.append(
            PinnedModel(m.name, m.path, m.url, pin if isinstance(pin, str) and _SHA256.match(pin) else None)
        )
    return found


def unpinned_models(names: tuple[str, ...], directory: Path = workflows.DEFAULT_DIR) -> list[str]:
    """ "workflow: model" for each model of these workflows that has no valid sha256 in its binding."""
    return [f"{n}: {m.name}" for n in names for m in workflow_models(n, directory) if m.sha256 is None]


class ModelError(Exception):
    pass


def fetch_model(
    model: PinnedModel,
    comfy_dir: Path,
    *,
    attempts: int = 5,
    chunk: int = 1 << 20,
    retry_pause_s: float = 5.0,
) -> bool:
    """Download `model` under `comfy_dir` unless it is there already, checked; answer whether it fetched.

    The bytes are hashed as they arrive (resuming a partial download after a dropped connection) and the
    file is moved into place only when the sha256 is the pinned one; a file already in place is hashed
    once, then trusted by the `.sha256` note beside it. Raises ModelError (nothing left in place)."""
    if model.sha256 is None:
        raise ModelError(f"{model.name} has no sha256 in its workflow binding; refusing to download it")
    dest = comfy_dir / model.path
    note = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        if note.is_file() and note.read_text().strip() == model.sha256:
            return False
        if sha256_of(dest) == model.sha256:
            note.write_text(model.sha256)
            return False
        log.warning("%s is not the pinned file (sha256 differs); downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _download(model.url, part, chunk)
            break
        except (requests.RequestException, OSError) as e:
            if attempt == attempts:
                raise ModelError(f"downloading {model.name} from {model.url}: {e}") from None
            log.warning("downloading %s: %s; resuming in %gs", model.name, e, retry_pause_s * attempt)
            time.sleep(retry_pause_s * attempt)
    got = sha256_of(part)
    if got != model.sha256:
        part.unlink()
        raise ModelError(f"{model.url} gave {model.name} with sha256 {got}, not the pinned {model.sha256}")
    part.replace(dest)
    note.write_text(model.sha256)
    return True


def _download(url: str, part: Path, chunk: int) -> None:
    """Append to `part` what the server has beyond its current size (all of it when it ignores Range)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=(30, 300)) as r:
        if have and r.status_code == 416:  # nothing beyond: the whole file is there
            return
        r.raise_for_status()
        with part.open("ab" if have and r.status_code == 206 else "wb") as f:
            for data in r.iter_content(chunk):
                f.write(data)


def fetch_models(comfy_dir: Path, names: list[str], directory: Path) -> None:
    """Every model the named workflows need, in place under comfy_dir and checked."""
    for name in names:
        for model in workflow_models(name, directory):
            if fetch_model(model, comfy_dir):
                log.info("downloaded %s (sha256 checked)", model.path)


def main(argv: list[str]) -> int:
    """On the rented machine, from onstart: `python -m manager.bootstrap models COMFY_DIR [w1,w2]`
    (workflows from GPUQ_WORKFLOWS_DIR, default the installed gpuq's)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s onstart: %(message)s")
    if len(argv) not in (2, 3) or argv[0] != "models":
        print("usage: python -m manager.bootstrap models COMFY_DIR [WORKFLOW,...]", file=sys.stderr)
        return 2
    names = [n for n in (argv[2] if len(argv) == 3 else "").split(",") if n]
    directory = Path(os.environ.get("GPUQ_WORKFLOWS_DIR") or workflows.DEFAULT_DIR)
    from worker.errors import JobError

    try:
        fetch_models(Path(argv[1]), names, directory)
    except (ModelError, JobError, OSError) as e:
        print(f"onstart: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
