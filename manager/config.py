"""The manager's configuration: a JSON (or TOML) file named by GPUQ_MANAGER_CONFIG, plus environment.

The file holds what is per queue and the money caps; secrets and deployment facts come from the
environment. Without a file the manager serves one queue, `default`, with local worker processes.

    {
      "daily_budget": 25.0, "max_total_dph": 4.0, "budget_tz": "Europe/Madrid",
      "ready_timeout_s": 1200, "heartbeat_timeout_s": 120, "drain_timeout_s": 900,
      "queues": {
        "tryon": {"provider": "vast", "max_instances": 4, "idle_timeout_s": 1800,
                  "windows": ["09:00-01:00"], "tz": "Europe/Madrid",
                  "image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", "disk_gb": 80,
                  "backend": "comfyui", "workflows": ["looks_tryon"],
                  "offer": {"gpu_names": ["RTX 6000Ada"], "min_vram_mb": 46000, "max_dph": 1.3,
                            "interruptible": false}}
      }
    }

Queue keys: provider, backend, image, disk_gb, workflows, env (extra instance env), concurrency (jobs an
instance runs at once, default 1), the QueuePolicy
fields (target_jobs_per_instance, target_utilisation, scale_in_utilisation, min_instances,
max_instances, idle_timeout_s, windows, tz) and `offer` (the OfferFilter fields). Top-level keys:
the PolicySettings fields except `queues` and the cold pool's (the simulator's only), among them the cost
levers: reboot_s and reboot_usd (break-even hold: what a new instance costs before its first job) and
prewarm_s (have the forecast's instances ready this long before a window opens; gpuq.queue_forecast()).

Environment (the README's table lists the same):
  GPUQ_MANAGER_CONFIG         path of the file above (default: none, one local `default` queue)
  GPUQ_MANAGER_PROVIDERS      providers to reconcile and rent from, comma-separated (default: those
                              the queues name, else `local`)
  GPUQ_DEPLOYMENT             our label is gpuq:<deployment>:<queue>; reconciliation owns every instance
                              labelled gpuq:<deployment>: (default `default`)
  GPUQ_MANAGER_TICK_SECONDS   `run`'s interval (default 60)
  GPUQ_MANAGER_DB_TIMEOUT_SECONDS  the longest the manager waits for one database statement (or a
                              connection) before giving up on that connection (default 30): a silent
                              database must not stall a tick while what it rented bills
  GPUQ_ORPHAN_TIMEOUT_SECONDS a rented instance with no job and no manager tick for this long (or no
                              database) ends itself (default 3600; 0: never)
  GPUQ_DAILY_BUDGET           overrides daily_budget ($, default 10)
  GPUQ_MAX_TOTAL_DPH          overrides max_total_dph ($/h, default 2)
  GPUQ_BUDGET_TZ              overrides budget_tz (default UTC)
  GPUQ_METRICS_FILE           write Prometheus metrics here after each tick (textfile collector)
  GPUQ_MANAGER_METRICS_PORT   `run` serves /metrics on this port (default: off)
  GPUQ_WORKER_DATABASE_URL    the DATABASE_URL rented machines get: a login that is a member of
                              gpuq_worker and nothing more (required to rent anywhere but local: there
                              is no fallback to DATABASE_URL; local workers get the manager's)
  GPUQ_STORAGE_URL            where workers put outputs (passed on to instances)
  GPUQ_WORKER_ENV             names of further variables passed to instances, comma-separated, e.g.
                              SUPABASE_URL,GPUQ_COMFYUI_VERSION; never a manager secret (SECRET_NAMES)
  GPUQ_INSTALL_STORAGE_URL    where the manager puts its own wheel for rented machines to install, with
                              a public URL (default GPUQ_STORAGE_URL), e.g. s3://b/gpuq?public=true
  GPUQ_INSTALL_URL, GPUQ_INSTALL_SHA256   instead: a wheel of this gpuq version served elsewhere
  GPUQ_INSTALL_SPEC           instead: a pinned release, `NAME==VERSION --hash=sha256:HEX`
  GPUQ_BOOTSTRAP_URL          fetch onstart.sh from here when its packed copy does not fit
  GPUQ_S3_ROLE_ARN, SUPABASE_JWT_SECRET with SUPABASE_ANON_KEY, GPUQ_CREDENTIALS_SECONDS
                              each rented instance's own storage credentials (manager/credentials.py)
  VAST_API_KEY                Vast.ai API key (vast provider); GPUQ_VAST_URL another API server
  GPUQ_AWS_REGION, GPUQ_AWS_AMI, GPUQ_AWS_INSTANCE_TYPES, GPUQ_AWS_SUBNET, GPUQ_AWS_SECURITY_GROUPS,
  GPUQ_AWS_INSTANCE_PROFILE, GPUQ_AWS_ENDPOINT_URL   the aws_spot provider
  GPUQ_LOCAL_SLOTS            how many local workers may run at once (default 2)
  GPUQ_LOCAL_GRACE_SECONDS    SIGTERM to SIGKILL for a local worker (default 20)
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

import gpuq
from gpuq.settings import env_float, env_int, env_str
from manager.policy import PolicySettings, QueuePolicy, Window
from manager.providers.base import OfferFilter

DEFAULT_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"


@dataclass(frozen=True)
class QueueLaunch:
    """How an instance for a queue is rented and started."""

    provider: str = "local"
    backend: str = "comfyui"  # the worker backend serving the queue: comfyui, f5tts, imageops
    image: str = DEFAULT_IMAGE
    disk_gb: int = 60
    workflows: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    concurrency: int = 1  # jobs an instance runs at once: the database holds it to that

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise SystemExit(f"gpuq manager: concurrency must be between 1 and 256, got {self.concurrency}")


@dataclass(frozen=True)
class ManagerSettings:
    policy: PolicySettings
    launch: dict[str, QueueLaunch]
    providers: tuple[str, ...]
    deployment: str = "default"
    tick_seconds: float = 60.0
    metrics_file: Path | None = None
    metrics_port: int | None = None
    worker_database_url: str | None = None
    storage_url: str | None = None
    worker_env_names: tuple[str, ...] = ()
    # How a rented machine installs this gpuq (manager/bootstrap.py install_env): a pinned requirement,
    # a wheel at a URL with its sha256, or (neither set) the manager's own wheel put in storage.
    install_spec: str | None = None
    install_url: str | None = None
    install_sha256: str | None = None
    install_storage_url: str | None = None
    bootstrap_url: str | None = None
    # A rented instance idle this long with no manager tick (or without its database) ends itself.
    orphan_timeout_s: float = 3600.0
    db_timeout_s: float = 30.0  # the longest one database statement may take

    @property
    def label_prefix(self) -> str:
        return f"gpuq:{self.deployment}:"

    def label(self, queue: str) -> str:
        return f"{self.label_prefix}{queue}"

    @classmethod
    def from_env(cls) -> ManagerSettings:
        path = os.environ.get("GPUQ_MANAGER_CONFIG")
        # Without a file: the embedded default, one model-free queue on local workers.
        raw = (
            load_file(Path(path))
            if path
            else {"queues": {"default": {"provider": "local", "backend": "imageops"}}}
        )
        return from_dict(raw)


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"gpuq manager: cannot read GPUQ_MANAGER_CONFIG {path}: {e}") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"gpuq manager: {path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None


def _pick(cls: type, raw: dict[str, Any], where: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    known = {f.name for f in fields(cls)} - skip
    unknown = set(raw) - known
    if unknown:
        raise SystemExit(f"gpuq manager: unknown keys in {where}: {', '.join(sorted(unknown))}")
    return dict(raw)


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SystemExit(f"gpuq manager: {name} must be a number, got {value!r}") from None


def from_dict(raw: dict[str, Any]) -> ManagerSettings:
    """Settings from the parsed file, with the environment's overrides."""
    raw = dict(raw)
    queues_raw: dict[str, Any] = raw.pop("queues", None) or {}
    if not queues_raw:
        raise SystemExit("gpuq manager: the configuration names no queue")
    launch_keys = {f.name for f in fields(QueueLaunch)}
    queues: dict[str, QueuePolicy] = {}
    launch: dict[str, QueueLaunch] = {}
    for name, q in queues_raw.items():
        q = dict(q)
        lk = {k: q.pop(k) for k in list(q) if k in launch_keys}
        provider = lk.get("provider", "local")
        offer_raw = dict(q.pop("offer", {}))
        # Local workers are not interruptible and have no Vast-style verification.
        offer_raw.setdefault("interruptible", provider != "local")
        offer_raw["provider"] = provider  # a queue's offers come from its own provider only
        for key in ("gpu_names", "locations"):
            if key in offer_raw:
                offer_raw[key] = tuple(offer_raw[key])
        if provider == "local":
            offer_raw.setdefault("min_disk_gb", 0)
        else:
            # search for (and price storage at) at least the disk the launch asks for
            disk = float(lk.get("disk_gb", QueueLaunch.disk_gb))
            offer_raw["min_disk_gb"] = max(float(offer_raw.get("min_disk_gb", 0)), disk)
        offer = OfferFilter(**_pick(OfferFilter, offer_raw, f"queues.{name}.offer"))
        if "windows" in q:
            q["windows"] = tuple(Window.parse(w) for w in q["windows"])
        try:
            queues[name] = QueuePolicy(
                # packing is the simulator's until a rent can launch a worker for several queues
                offer_filter=offer,
                **_pick(QueuePolicy, q, f"queues.{name}", {"offer_filter", "packs"}),
            )
        except (TypeError, ValueError) as e:
            raise SystemExit(f"gpuq manager: queues.{name}: {e}") from None
        if "workflows" in lk:
            lk["workflows"] = tuple(lk["workflows"])
        if "env" in lk:
            lk["env"] = {str(k): str(v) for k, v in lk["env"].items()}
        if "concurrency" in lk and (
            not isinstance(lk["concurrency"], int) or isinstance(lk["concurrency"], bool)
        ):
            raise SystemExit(
                f"gpuq manager: queues.{name}.concurrency must be a whole number, got {lk['concurrency']!r}"
            )
        launch[name] = QueueLaunch(**lk)
        if provider != "local":
            _check_models_pinned(name, launch[name].workflows)
            if launch[name].backend == "f5tts":
                _check_f5tts_pinned(name, launch[name].env)

    # The cold pool is the simulator's until a provider can stop and start: not a configuration key.
    top = _pick(PolicySettings, raw, "the configuration", {"queues", "cold_pool_s", "cold_idle_s"})
    top.setdefault("daily_budget", 10.0)
    top.setdefault("max_total_dph", 2.0)
    top["daily_budget"] = env_float("GPUQ_DAILY_BUDGET", _number(top["daily_budget"], "daily_budget"))
    top["max_total_dph"] = env_float("GPUQ_MAX_TOTAL_DPH", _number(top["max_total_dph"], "max_total_dph"))
    top["budget_tz"] = env_str("GPUQ_BUDGET_TZ", top.get("budget_tz", "UTC"))
    try:
        policy = PolicySettings(queues=queues, **top)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"gpuq manager: {e}") from None

    named = os.environ.get("GPUQ_MANAGER_PROVIDERS")
    providers = tuple(p.strip() for p in named.split(",") if p.strip()) if named else ()
    providers = providers or tuple(sorted({q.provider for q in launch.values()}))
    missing = {q.provider for q in launch.values()} - set(providers)
    if missing:
        raise SystemExit(f"gpuq manager: queues use providers not enabled: {', '.join(sorted(missing))}")

    tick_seconds = env_float("GPUQ_MANAGER_TICK_SECONDS", 60.0)
    db_timeout = env_float("GPUQ_MANAGER_DB_TIMEOUT_SECONDS", 30.0)
    if db_timeout <= 0:
        raise SystemExit(f"gpuq manager: GPUQ_MANAGER_DB_TIMEOUT_SECONDS must be above 0, got {db_timeout:g}")
    orphan_timeout = env_float("GPUQ_ORPHAN_TIMEOUT_SECONDS", 3600.0)
    # shorter, and a few slow or failed ticks would make healthy instances end themselves
    shortest = max(600.0, 5 * tick_seconds)
    if orphan_timeout and orphan_timeout < shortest:
        raise SystemExit(
            f"gpuq manager: GPUQ_ORPHAN_TIMEOUT_SECONDS must be 0 (off) or at least "
            f"{shortest:g} (600 s and 5 ticks), got {orphan_timeout:g}"
        )
    metrics_file = os.environ.get("GPUQ_METRICS_FILE")
    port = env_int("GPUQ_MANAGER_METRICS_PORT", 0)
    worker_env = tuple(n.strip() for n in os.environ.get("GPUQ_WORKER_ENV", "").split(",") if n.strip())
    worker_url = os.environ.get("GPUQ_WORKER_DATABASE_URL") or None
    _check_host_settings(launch, worker_env, worker_url)
    install = _install_settings()
    return ManagerSettings(
        policy=policy,
        launch=launch,
        providers=providers,
        deployment=env_str("GPUQ_DEPLOYMENT", "default"),
        tick_seconds=tick_seconds,
        metrics_file=Path(metrics_file) if metrics_file else None,
        metrics_port=port or None,
        # never DATABASE_URL: that is the owner's (or the manager's) login, and hosts are strangers
        worker_database_url=worker_url,
        storage_url=os.environ.get("GPUQ_STORAGE_URL") or None,
        worker_env_names=worker_env,
        bootstrap_url=os.environ.get("GPUQ_BOOTSTRAP_URL") or None,
        orphan_timeout_s=orphan_timeout,
        db_timeout_s=db_timeout,
        **install,
    )


# --- what rented hosts may be given ------------------------------------------------------------------

# The manager's secrets, by the names it reads them under. GPUQ_WORKER_ENV copies the manager's own value
# of each name it lists, so none of these may be listed there; and no value a host gets may carry the
# value of any of them (check_host_env).
SECRET_NAMES = {
    "VAST_API_KEY": "the Vast.ai account key (a Vast host has its own, CONTAINER_API_KEY)",
    "DATABASE_URL": "the manager's database login (hosts get GPUQ_WORKER_DATABASE_URL)",
    "SUPABASE_SERVICE_ROLE_KEY": "a Supabase service-role key, which bypasses row level security",
    "SUPABASE_SERVICE_KEY": "a Supabase service-role key, which bypasses row level security",
    "SUPABASE_SECRET_KEY": "a Supabase secret key (sb_secret_…), which bypasses row level security",
    "SUPABASE_JWT_SECRET": "the Supabase project's JWT secret, which signs tokens of any role",
    "AWS_ACCESS_KEY_ID": "the manager's AWS key",
    "AWS_SECRET_ACCESS_KEY": "the manager's AWS key",
    "AWS_SESSION_TOKEN": "the manager's AWS session",
}
# A queue's `env` may give hosts AWS keys of their own (values unlike the manager's), but never these.
_NEVER_IN_QUEUE_ENV = (
    "VAST_API_KEY",
    "DATABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_SERVICE_KEY",
    "SUPABASE_SECRET_KEY",
    "SUPABASE_JWT_SECRET",
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.(eyJ[A-Za-z0-9_-]+)\.[A-Za-z0-9_-]*")
_SHORT = 12  # a secret shorter than this is matched whole, not inside longer values


def _login(url: str | None) -> dict[str, str]:
    """The keywords of a database URL or connection string; {} when it is neither."""
    if not url:
        return {}
    try:
        return psycopg.conninfo.conninfo_to_dict(url)  # type: ignore[return-value]
    except psycopg.Error:
        return {}


def _jwt_role(payload: str) -> object:
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return None
    return claims.get("role") if isinstance(claims, dict) else None


def secret_in(value: str, environ: Mapping[str, str]) -> str | None:
    """What manager secret `value` carries (named, never shown), or None."""
    for name in SECRET_NAMES:
        secret = environ.get(name) or ""
        if secret and (value == secret or (len(secret) >= _SHORT and secret in value)):
            return f"the value of the manager's {name}"
    password = _login(environ.get("DATABASE_URL")).get("password")
    if password and _login(value).get("password") == password:
        return "the manager's database password"
    if any(_jwt_role(payload) == "service_role" for payload in _JWT.findall(value)):
        return "a Supabase service-role key (a JWT whose role is service_role)"
    if "sb_secret_" in value:  # Supabase's new-style keys: sb_secret_… replaces service_role
        return "a Supabase secret key (sb_secret_…)"
    return None


def check_host_env(env: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> None:
    """Raise ValueError naming the first variable of `env` (what a rented host gets) that carries a
    manager secret."""
    for name, value in env.items():
        if why := secret_in(value, environ):
            raise ValueError(f"refusing to give rented hosts {name}: it carries {why}")


def _check_host_settings(
    launch: Mapping[str, QueueLaunch], worker_env: tuple[str, ...], worker_url: str | None
) -> None:
    """Refuse, at start, settings that would hand rented hosts a manager secret."""
    for name in worker_env:
        if name in SECRET_NAMES:
            raise SystemExit(
                f"gpuq manager: GPUQ_WORKER_ENV names {name}, {SECRET_NAMES[name]}: rented hosts must "
                "never get it"
            )
    if worker_url:
        manager_user = _login(os.environ.get("DATABASE_URL")).get("user")
        if manager_user and _login(worker_url).get("user") == manager_user:
            raise SystemExit(
                f"gpuq manager: GPUQ_WORKER_DATABASE_URL logs in as {manager_user!r}, the manager's own role "
                "(DATABASE_URL); give rented hosts a login of their own in role gpuq_worker"
            )
    for queue, q in launch.items():
        if q.provider == "local":
            continue  # processes on this machine: nothing leaves it
        for name in q.env:
            if name in _NEVER_IN_QUEUE_ENV:
                raise SystemExit(
                    f"gpuq manager: queues.{queue}.env sets {name}, {SECRET_NAMES[name]}: rented hosts must "
                    "never get it"
                )
        try:
            check_host_env(q.env)
        except ValueError as e:
            raise SystemExit(f"gpuq manager: queues.{queue}.env: {e}") from None


# --- what rented hosts install ---------------------------------------------------------------------


def _check_models_pinned(queue: str, names: tuple[str, ...]) -> None:
    """Refuse a rented queue whose workflows are unknown or name a model without a sha256: a rented
    machine downloads only models pinned by hash (manager/bootstrap.py fetch_model)."""
    from manager.bootstrap import unpinned_models  # imported here: bootstrap imports this module
    from worker.errors import JobError

    try:
        unpinned = unpinned_models(names)
    except JobError as e:
        raise SystemExit(f"gpuq manager: queues.{queue}.workflows: {e.message}") from None
    if unpinned:
        raise SystemExit(
            f"gpuq manager: queues.{queue}: models without a sha256 in their workflow binding: "
            f'{", ".join(unpinned)}; rented hosts download only models pinned by hash (add "sha256" '
            "to each model in workflows/NAME.binding.json)"
        )


# F5-TTS's model files and the variable that pins each (worker/backends/model_files.py checks the hash).
_F5TTS_FILES = {
    "F5TTS_CKPT_FILE": "F5TTS_CKPT_SHA256",
    "F5TTS_VOCAB_FILE": "F5TTS_VOCAB_SHA256",
    "F5TTS_VOCODER_DIR": "F5TTS_VOCODER_SHA256",
}


def _check_f5tts_pinned(queue: str, env: Mapping[str, str]) -> None:
    """Refuse a rented f5tts queue that leaves a model file to f5-tts's default (an unpinned hub download)
    or names a remote one without its sha256: rented hosts run only weights pinned by hash."""
    for name, pin in _F5TTS_FILES.items():
        where = env.get(name, "")
        if not where:
            raise SystemExit(
                f"gpuq manager: queues.{queue}.env: {name} is not set; a rented f5tts host would download "
                f"unpinned weights from the model hub: set it to a URL or s3:// path and {pin} to its sha256"
            )
        if "://" in where and not _SHA256.match(env.get(pin, "").strip().lower()):
            raise SystemExit(f"gpuq manager: queues.{queue}.env: {name} is remote; set {pin} to its sha256")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==(\S+)(\s+--hash=sha256:[0-9a-f]{64})+$")


def _install_settings() -> dict[str, Any]:
    """GPUQ_INSTALL_SPEC, or GPUQ_INSTALL_URL with GPUQ_INSTALL_SHA256, or GPUQ_INSTALL_STORAGE_URL,
    checked: whichever is used, a host installs this very version, pinned by its hash."""
    spec = (os.environ.get("GPUQ_INSTALL_SPEC") or "").strip() or None
    url = (os.environ.get("GPUQ_INSTALL_URL") or "").strip() or None
    sha = (os.environ.get("GPUQ_INSTALL_SHA256") or "").strip().lower() or None
    version = gpuq.__version__
    if spec and url:
        raise SystemExit("gpuq manager: set GPUQ_INSTALL_SPEC or GPUQ_INSTALL_URL, not both")
    if spec:
        pinned = _PINNED.match(spec)
        if not pinned:
            raise SystemExit(
                f"gpuq manager: GPUQ_INSTALL_SPEC must pin a version and its hash, e.g. "
                f"'gpuq=={version} --hash=sha256:<64 hex>', got {spec!r} (a bare name installs whatever "
                "an index has under it; 'gpuq' on PyPI is another project)"
            )
        if pinned.group(1) != version:
            raise SystemExit(
                f"gpuq manager: GPUQ_INSTALL_SPEC pins version {pinned.group(1)}; this manager runs {version}"
            )
    if url:
        parts = urlsplit(url)
        wheel = parts.path.rsplit("/", 1)[-1]
        if parts.scheme not in ("http", "https") or not wheel.startswith(f"gpuq-{version}-"):
            raise SystemExit(
                f"gpuq manager: GPUQ_INSTALL_URL must be an http(s) URL of gpuq-{version}-….whl (the "
                f"version this manager runs), got {url!r}"
            )
        if not wheel.endswith(".whl"):
            raise SystemExit(f"gpuq manager: GPUQ_INSTALL_URL must name a .whl file, got {url!r}")
    if bool(url) != bool(sha) or (sha and not _SHA256.match(sha)):
        raise SystemExit(
            "gpuq manager: GPUQ_INSTALL_URL needs GPUQ_INSTALL_SHA256, the wheel's sha256 (64 hex digits)"
        )
    return {
        "install_spec": spec,
        "install_url": url,
        "install_sha256": sha,
        "install_storage_url": os.environ.get("GPUQ_INSTALL_STORAGE_URL") or None,
    }
