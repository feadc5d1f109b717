"""`gpuq worker`: run the worker on this machine until SIGTERM/SIGINT (or a spot notice) drains it.

Configured from the environment (worker/config.py); --queues and --concurrency override GPUQ_QUEUES
and GPUQ_CONCURRENCY for a quick run, e.g. `gpuq worker --queues demo=imageops`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gpuq.db import connect, database_url, redact
from gpuq.migrate import migrate
from gpuq.settings import Settings
from worker.backends import BACKENDS
from worker.backends.base import Backend
from worker.config import ConfigError, WorkerSettings
from worker.errors import JobError
from worker.storage import storage_from_url

log = logging.getLogger("gpuq.worker")

_SECRET_PARAMS = ("key", "secret", "token", "password", "signature", "credential")


BACKEND_NOTES = {
    "comfyui": "images and video through a local ComfyUI (GPU)",
    "f5tts": "Spanish text to speech with F5-TTS (scripts/install_f5tts.sh)",
    "imageops": "model-free image transforms (invert, blur, resize...), no GPU: the demo's",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a worker on this machine until SIGTERM/SIGINT (or a spot notice) drains it. Backends: "
        + "; ".join(f"{name} ({BACKEND_NOTES.get(name, 'see worker/backends')})" for name in sorted(BACKENDS))
        + ". Configured from the environment (GPUQ_QUEUES, GPUQ_STORAGE_URL, ...; see the README)."
    )
    parser.add_argument(
        "--queues",
        help="queue=backend,... (overrides GPUQ_QUEUES), e.g. images=comfyui; backends: "
        + ", ".join(sorted(BACKENDS)),
    )
    parser.add_argument("--concurrency", help="backend=N,... (overrides GPUQ_CONCURRENCY), e.g. comfyui=1")
    parser.add_argument("--log-level", default=os.environ.get("GPUQ_LOG_LEVEL", "INFO"), help="default INFO")


def redact_url(url: str) -> str:
    """A storage or database URL fit for logs: no password, no secret-looking query values."""
    url = redact(url)
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (k, "***" if any(s in k.lower() for s in _SECRET_PARAMS) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*/:")))


def summary(config: WorkerSettings, settings: Settings, db_url: str) -> str:
    lines = ["gpuq worker"]
    for backend in config.backends:
        lines.append(
            f"  serves    {', '.join(config.queues_of(backend))} -> {backend} "
            f"(concurrency {config.concurrency[backend]})"
        )
    lines += [
        f"  storage   {redact_url(config.storage_url)}",
        f"  database  {redact_url(db_url)}",
        f"  instance  {config.provider}/{config.provider_instance_id}",
        f"  lease     {settings.lease_seconds}s, heartbeat every {config.heartbeat_seconds:g}s, "
        f"poll every {settings.poll_seconds:g}s",
        f"  drain     grace {config.drain_grace_seconds:g}s"
        + (f"; spot notices from {config.spot_metadata_url}" if config.spot_watch else ""),
        f"  inputs    at most {config.input_max_bytes} bytes, {config.input_timeout_seconds:g}s each",
        "            local files "
        + (f"under {', '.join(map(str, config.input_dirs))}" if config.input_dirs else "refused")
        + "; URLs "
        + ("on private networks too" if config.input_allow_private else "on public addresses only"),
        "            buckets " + (", ".join(config.input_buckets) or "refused"),
        "  orphan    "
        + (
            f"ends the machine after {config.orphan_timeout_seconds:g}s with no job and no manager tick"
            if config.orphan_timeout_seconds
            else "off"
        ),
        "  metrics   "
        + (f"http://{config.metrics_host}:{config.metrics_port}/metrics" if config.metrics_port else "off"),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.main import Worker  # imported here: `gpuq --help` need not load the worker

    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env = dict(os.environ)
    if getattr(args, "queues", None):
        env["GPUQ_QUEUES"] = args.queues
    if getattr(args, "concurrency", None):
        env["GPUQ_CONCURRENCY"] = args.concurrency
    try:
        config = WorkerSettings.from_env(settings, env)
        storage = storage_from_url(config.storage_url)
    except (ConfigError, ValueError) as exc:
        print(f"gpuq worker: {exc}", file=sys.stderr)
        return 2
    backends: dict[str, Backend] = {}
    for name in config.backends:
        try:
            backends[name] = BACKENDS[name](env)
        except ValueError as exc:  # a setting of the backend's
            print(f"gpuq worker: cannot set up backend {name}: {exc}", file=sys.stderr)
            return 2
        except ImportError as exc:  # its packages are not installed here
            print(f"gpuq worker: cannot set up backend {name}: {exc}", file=sys.stderr)
            return 3
    url = database_url(settings)
    if settings.database_url is None:  # the embedded default is ours: migrated on the way, as the CLI does
        with connect(url, settings) as conn:
            migrate(conn)
    print(summary(config, settings, url), file=sys.stderr, flush=True)

    worker = Worker(url, settings, config, backends, storage)
    worker.install_signal_handlers()
    try:
        return worker.run()
    except JobError as exc:  # a backend that cannot start
        print(f"gpuq worker: {exc}", file=sys.stderr)
        return 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuq worker", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, Settings.from_env())
