"""Configuration shared by every gpuq process, from environment variables (and a `.env` file).

The README's configuration table lists every variable; keep the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"gpuq: {name} must be a whole number, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"gpuq: {name} must be a number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if not raw:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"gpuq: {name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    database_url: str | None  # None: start the embedded Postgres under data_dir
    data_dir: Path  # embedded Postgres data, local outputs
    transaction_pooler: bool  # e.g. Supabase's pooler on port 6543: no LISTEN, no prepared statements
    lease_seconds: int
    poll_seconds: float

    @classmethod
    def from_env(cls) -> Settings:
        load_dotenv(override=False)
        url = os.environ.get("DATABASE_URL") or None
        default_pooler = bool(url) and urlsplit(url).port == 6543
        settings = cls(
            database_url=url,
            data_dir=Path(env_str("GPUQ_DATA_DIR", ".gpuq")).resolve(),
            transaction_pooler=env_bool("GPUQ_TRANSACTION_POOLER", default_pooler),
            lease_seconds=env_int("GPUQ_LEASE_SECONDS", 60),
            poll_seconds=env_float("GPUQ_POLL_SECONDS", 5.0),
        )
        if settings.lease_seconds < 3:
            raise SystemExit("gpuq: GPUQ_LEASE_SECONDS must be at least 3")
        return settings
