"""The worker's settings, from environment variables (and the `.env` file gpuq's Settings loads).

Every bad value stops the worker at start-up with a message naming the variable, never mid-job.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gpuq.settings import SettingError, Settings, parse_bool, parse_float, parse_int
from worker.errors import JobError
from worker.storage import storage_from_url
from worker.storage.local import LocalStorage

KNOWN_BACKENDS = ("comfyui", "f5tts", "imageops")
_QUEUE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")  # the SQL constraint on gpuq.jobs.queue
_PROVIDER = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # the SQL constraint on gpuq.instances.provider
_BUCKET = re.compile(r"^[A-Za-z0-9._-]+$")
BUCKET_SCHEMES = ("s3", "supabase")
EC2_DMI_FILES = ("/sys/devices/virtual/dmi/id/board_vendor", "/sys/devices/virtual/dmi/id/sys_vendor")


# A setting the worker cannot run with; the message names the variable and the fix.
ConfigError = SettingError


@dataclass(frozen=True)
class WorkerSettings:
    queues: dict[str, str]  # queue -> backend name
    concurrency: dict[str, int]  # backend name -> jobs at once
    storage_url: str
    provider: str
    provider_instance_id: str
    heartbeat_seconds: float
    drain_grace_seconds: float
    metrics_port: int  # 0: no endpoint
    metrics_host: str
    input_max_bytes: int
    input_timeout_seconds: float
    input_dirs: tuple[Path, ...]  # local paths and file:// inputs only from under these
    input_buckets: tuple[str, ...]  # s3:// and supabase:// inputs only from these, as "scheme://bucket"
    input_allow_private: bool  # http(s) inputs may reach loopback and private addresses
    spot_watch: bool
    spot_metadata_url: str
    spot_poll_seconds: float
    work_dir: Path  # per-job scratch directories live under it
    # A rented instance that sees no manager tick and has no job for this long (or cannot reach the
    # database this long) runs self_terminate_cmd and exits: it bills for nobody. 0: never.
    orphan_timeout_seconds: float = 0.0
    self_terminate_cmd: str = ""
    # The instance's secret from the manager or `gpuq enroll` (GPUQ_INSTANCE_SECRET); empty: the worker
    # enrolls itself, which only a login with the manager's rights may do (the embedded default).
    instance_secret: str = ""
    # How long to wait for the manager to record the rent before the secret is known (it creates the
    # machine first, then records it).
    register_wait_seconds: float = 300.0
    state_dir: Path = Path(".gpuq/worker")  # the rotated secret and outcomes not yet reported

    @property
    def backends(self) -> list[str]:
        """The backends served, in the order their queues were named."""
        return list(dict.fromkeys(self.queues.values()))

    def queues_of(self, backend: str) -> list[str]:
        return [q for q, b in self.queues.items() if b == backend]

    @property
    def max_concurrency(self) -> int:
        return sum(self.concurrency[b] for b in self.backends)

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        queues = parse_queues(env.get("GPUQ_QUEUES") or "")
        concurrency = parse_concurrency(env.get("GPUQ_CONCURRENCY", ""), set(queues.values()))

        provider = (env.get("GPUQ_PROVIDER") or "local").strip()
        if not _PROVIDER.match(provider):
            raise ConfigError(
                f"GPUQ_PROVIDER must be a lowercase name like 'vast' or 'aws_spot', got {provider!r}"
            )
        instance_id = (env.get("GPUQ_PROVIDER_INSTANCE_ID") or "").strip()
        if not instance_id and provider == "vast" and env.get("CONTAINER_ID"):
            instance_id = env["CONTAINER_ID"].strip()  # Vast sets it in every container: the instance id
        if not instance_id:
            instance_id = f"{socket.gethostname()}-{os.getpid()}"

        lease = settings.lease_seconds
        heartbeat = parse_float(env, "GPUQ_HEARTBEAT_SECONDS", lease / 4)
        if heartbeat <= 0:
            raise ConfigError(f"GPUQ_HEARTBEAT_SECONDS must be positive, got {heartbeat:g}")
        if heartbeat >= lease / 2:
            # one late or lost heartbeat must not be enough to lose every job this worker holds
            raise ConfigError(
                f"GPUQ_HEARTBEAT_SECONDS={heartbeat:g} is too slow for GPUQ_LEASE_SECONDS={lease}: "
                f"it must be under half the lease (< {lease / 2:g}); the default is lease/4 = {lease / 4:g}"
            )

        spot_raw = (env.get("GPUQ_SPOT_WATCH") or "auto").strip().lower()
        if spot_raw == "auto":
            spot = provider.startswith("aws") or on_ec2()
        elif spot_raw in ("1", "true", "yes", "on"):
            spot = True
        elif spot_raw in ("0", "false", "no", "off"):
            spot = False
        else:
            raise ConfigError(f"GPUQ_SPOT_WATCH must be auto, true or false, got {spot_raw!r}")

        port = parse_int(env, "GPUQ_METRICS_PORT", 0)
        if not 0 <= port <= 65535:
            raise ConfigError(f"GPUQ_METRICS_PORT must be 0 (off) or a port number, got {port}")
        max_bytes = parse_int(env, "GPUQ_INPUT_MAX_BYTES", 200 * 1024 * 1024)
        if max_bytes < 1:
            raise ConfigError(f"GPUQ_INPUT_MAX_BYTES must be at least 1, got {max_bytes}")
        input_timeout = parse_float(env, "GPUQ_INPUT_TIMEOUT_SECONDS", 120.0)
        grace = parse_float(env, "GPUQ_DRAIN_GRACE_SECONDS", 90.0)
        spot_poll = parse_float(env, "GPUQ_SPOT_POLL_SECONDS", 5.0)
        for name, value in (
            ("GPUQ_INPUT_TIMEOUT_SECONDS", input_timeout),
            ("GPUQ_SPOT_POLL_SECONDS", spot_poll),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value:g}")
        if grace < 0:
            raise ConfigError(f"GPUQ_DRAIN_GRACE_SECONDS must not be negative, got {grace:g}")
        orphan_timeout = parse_float(env, "GPUQ_ORPHAN_TIMEOUT_SECONDS", 0.0)
        terminate_cmd = (env.get("GPUQ_SELF_TERMINATE_CMD") or "").strip()
        if orphan_timeout < 0:
            raise ConfigError(f"GPUQ_ORPHAN_TIMEOUT_SECONDS must not be negative, got {orphan_timeout:g}")
        if orphan_timeout and not terminate_cmd:
            # exiting alone would leave the machine billing: it has to be told how to end itself
            raise ConfigError("GPUQ_ORPHAN_TIMEOUT_SECONDS needs GPUQ_SELF_TERMINATE_CMD")

        secret = (env.get("GPUQ_INSTANCE_SECRET") or "").strip()
        if secret and not 16 <= len(secret) <= 256:
            raise ConfigError("GPUQ_INSTANCE_SECRET is not an instance secret (16 to 256 characters)")
        register_wait = parse_float(env, "GPUQ_REGISTER_WAIT_SECONDS", 300.0)
        if register_wait < 0:
            raise ConfigError(f"GPUQ_REGISTER_WAIT_SECONDS must not be negative, got {register_wait:g}")

        storage_url = env.get("GPUQ_STORAGE_URL") or str(settings.data_dir / "outputs")
        raw_dirs = env.get("GPUQ_INPUT_DIRS")
        input_dirs = parse_input_dirs(raw_dirs) if raw_dirs else _local_storage_root(storage_url)
        raw_buckets = env.get("GPUQ_INPUT_BUCKETS")
        input_buckets = parse_input_buckets(raw_buckets) if raw_buckets else _output_bucket(storage_url)

        return cls(
            queues=queues,
            concurrency=concurrency,
            storage_url=storage_url,
            provider=provider,
            provider_instance_id=instance_id,
            heartbeat_seconds=heartbeat,
            drain_grace_seconds=grace,
            metrics_port=port,
            metrics_host=env.get("GPUQ_METRICS_HOST") or "0.0.0.0",
            input_max_bytes=max_bytes,
            input_timeout_seconds=input_timeout,
            input_dirs=input_dirs,
            input_buckets=input_buckets,
            input_allow_private=parse_bool(env, "GPUQ_INPUT_ALLOW_PRIVATE", False),
            spot_watch=spot,
            spot_metadata_url=(env.get("GPUQ_SPOT_METADATA_URL") or "http://169.254.169.254").rstrip("/"),
            spot_poll_seconds=spot_poll,
            work_dir=settings.data_dir / "work",
            orphan_timeout_seconds=orphan_timeout,
            self_terminate_cmd=terminate_cmd,
            instance_secret=secret,
            register_wait_seconds=register_wait,
            state_dir=settings.data_dir / "worker",
        )


def parse_queues(raw: str) -> dict[str, str]:
    """ "images=comfyui,tts=f5tts" -> {"images": "comfyui", "tts": "f5tts"}."""
    queues: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        queue, sep, backend = (s.strip() for s in item.partition("="))
        if not sep or not queue or not backend:
            raise ConfigError(f"GPUQ_QUEUES entries are queue=backend, e.g. 'images=comfyui'; got {item!r}")
        if not _QUEUE.match(queue):
            raise ConfigError(f"GPUQ_QUEUES: {queue!r} is not a valid queue name (lowercase, digits, _ . -)")
        if backend not in KNOWN_BACKENDS:
            raise ConfigError(
                f"GPUQ_QUEUES: unknown backend {backend!r} for queue {queue!r}; "
                f"known: {', '.join(KNOWN_BACKENDS)}"
            )
        if queue in queues:
            raise ConfigError(f"GPUQ_QUEUES names queue {queue!r} twice")
        queues[queue] = backend
    if not queues:
        raise ConfigError(
            "GPUQ_QUEUES is not set: name the queues this worker serves and the backend of each, "
            "e.g. GPUQ_QUEUES=images=comfyui,tts=f5tts (backends: comfyui, f5tts, imageops)"
        )
    return queues


def parse_concurrency(raw: str, backends: set[str]) -> dict[str, int]:
    """ "comfyui=2,f5tts=1" -> per-backend slots; backends not named get 1."""
    result = dict.fromkeys(backends, 1)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        backend, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"GPUQ_CONCURRENCY entries are backend=N, e.g. 'comfyui=1'; got {item!r}")
        if backend not in KNOWN_BACKENDS:
            raise ConfigError(
                f"GPUQ_CONCURRENCY: unknown backend {backend!r}; known: {', '.join(KNOWN_BACKENDS)}"
            )
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"GPUQ_CONCURRENCY: {backend}={value!r} is not a whole number") from None
        if not 1 <= n <= 256:
            raise ConfigError(f"GPUQ_CONCURRENCY: {backend}={n} must be between 1 and 256")
        if backend in backends:  # a backend this worker does not serve is ignored, not an error
            result[backend] = n
    return result


def parse_input_dirs(raw: str) -> tuple[Path, ...]:
    """ "/srv/inputs:/data/refs" (os.pathsep between) -> existing absolute directories, symlinks resolved."""
    dirs = []
    for item in filter(None, (part.strip() for part in raw.split(os.pathsep))):
        path = Path(item)
        if not path.is_absolute():
            raise ConfigError(f"GPUQ_INPUT_DIRS entries must be absolute paths, got {item!r}")
        if not path.is_dir():
            raise ConfigError(f"GPUQ_INPUT_DIRS: {item} is not a directory")
        dirs.append(path.resolve())
    return tuple(dirs)


def parse_input_buckets(raw: str) -> tuple[str, ...]:
    """ "uploads,s3://refs" -> ("s3://uploads", "supabase://uploads", "s3://refs"): a bare name allows
    that bucket for both s3:// and supabase://, "scheme://bucket" for the one scheme."""
    buckets: list[str] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        scheme, sep, name = item.rpartition("://")
        scheme = scheme.lower()
        if sep and scheme not in BUCKET_SCHEMES:
            raise ConfigError(
                f"GPUQ_INPUT_BUCKETS: {item!r} is not s3://bucket, supabase://bucket or a bare bucket name"
            )
        name = name.rstrip("/")
        if not _BUCKET.match(name):
            raise ConfigError(
                f"GPUQ_INPUT_BUCKETS entries are whole buckets (letters, digits, . _ -), "
                f"optionally s3:// or supabase://; got {item!r}"
            )
        buckets += [f"{s}://{name}" for s in ((scheme,) if sep else BUCKET_SCHEMES)]
    return tuple(dict.fromkeys(buckets))


def _output_bucket(storage_url: str) -> tuple[str, ...]:
    """The default GPUQ_INPUT_BUCKETS: the output bucket when outputs go to S3 or Supabase, so a job may
    take an earlier job's output; nothing else the worker's credentials can read."""
    parts = urlsplit(storage_url.strip())
    if parts.scheme in BUCKET_SCHEMES and parts.netloc:
        return (f"{parts.scheme}://{parts.netloc}",)
    return ()


def _local_storage_root(storage_url: str) -> tuple[Path, ...]:
    """The default GPUQ_INPUT_DIRS: the output directory when outputs are local, so a job may take an
    earlier job's output; nothing else on the machine (its data dir also holds other jobs' work dirs)."""
    if urlsplit(storage_url.strip()).scheme not in ("", "file"):
        return ()
    try:
        storage = storage_from_url(storage_url)
    except (ValueError, JobError):
        return ()  # the worker refuses this storage URL itself, in its own words
    return (storage.root,) if isinstance(storage, LocalStorage) else ()


def on_ec2() -> bool:
    for path in EC2_DMI_FILES:
        try:
            if "amazon" in Path(path).read_text().lower():
                return True
        except OSError:
            continue
    return False
