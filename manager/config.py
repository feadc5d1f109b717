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

Queue keys: provider, backend, image, disk_gb, workflows, env (extra instance env), the QueuePolicy
fields (target_jobs_per_instance, target_utilisation, scale_in_utilisation, min_instances,
max_instances, idle_timeout_s, windows, tz) and `offer` (the OfferFilter fields). Top-level keys:
the PolicySettings fields except `queues`.

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
  GPUQ_WORKER_DATABASE_URL    the DATABASE_URL rented machines get: the gpuq_worker role's
                              (default: DATABASE_URL; local workers always get the manager's)
  GPUQ_STORAGE_URL            where workers put outputs (passed on to instances)
  GPUQ_WORKER_ENV             names of further variables passed to instances, comma-separated, e.g.
                              AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,SUPABASE_URL,SUPABASE_SERVICE_KEY
  GPUQ_INSTALL_SPEC           what the bootstrap pip-installs on a rented machine (wheel URL or
                              git+https URL; default `gpuq`)
  GPUQ_BOOTSTRAP_URL          fetch onstart.sh from here when its packed copy does not fit
  VAST_API_KEY                Vast.ai API key (vast provider); GPUQ_VAST_URL another API server
  GPUQ_AWS_REGION, GPUQ_AWS_AMI, GPUQ_AWS_INSTANCE_TYPES, GPUQ_AWS_SUBNET, GPUQ_AWS_SECURITY_GROUPS,
  GPUQ_AWS_INSTANCE_PROFILE, GPUQ_AWS_ENDPOINT_URL   the aws_spot provider
  GPUQ_LOCAL_SLOTS            how many local workers may run at once (default 2)
  GPUQ_LOCAL_GRACE_SECONDS    SIGTERM to SIGKILL for a local worker (default 20)
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

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
    install_spec: str = "gpuq"
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
                offer_filter=offer, **_pick(QueuePolicy, q, f"queues.{name}", {"offer_filter"})
            )
        except (TypeError, ValueError) as e:
            raise SystemExit(f"gpuq manager: queues.{name}: {e}") from None
        if "workflows" in lk:
            lk["workflows"] = tuple(lk["workflows"])
        if "env" in lk:
            lk["env"] = {str(k): str(v) for k, v in lk["env"].items()}
        launch[name] = QueueLaunch(**lk)

    top = _pick(PolicySettings, raw, "the configuration", {"queues"})
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
    worker_env = os.environ.get("GPUQ_WORKER_ENV", "")
    return ManagerSettings(
        policy=policy,
        launch=launch,
        providers=providers,
        deployment=env_str("GPUQ_DEPLOYMENT", "default"),
        tick_seconds=tick_seconds,
        metrics_file=Path(metrics_file) if metrics_file else None,
        metrics_port=port or None,
        worker_database_url=os.environ.get("GPUQ_WORKER_DATABASE_URL") or os.environ.get("DATABASE_URL"),
        storage_url=os.environ.get("GPUQ_STORAGE_URL") or None,
        worker_env_names=tuple(n.strip() for n in worker_env.split(",") if n.strip()),
        install_spec=env_str("GPUQ_INSTALL_SPEC", "gpuq"),
        bootstrap_url=os.environ.get("GPUQ_BOOTSTRAP_URL") or None,
        orphan_timeout_s=orphan_timeout,
        db_timeout_s=db_timeout,
    )
