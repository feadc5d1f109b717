"""Configuration shared by every gpuq process, from environment variables (and a `.env` file).

The README's configuration table lists every variable; keep the two in step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from dotenv import load_dotenv

T = TypeVar("T")


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default


class SettingError(ValueError):
    """A malformed setting; the message names the variable."""


def parse_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingError(f"{name} must be a whole number, got {raw!r}") from None


def parse_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):  # nan passes every "> cap" test as false
        raise SettingError(f"{name} must be a finite number, got {raw!r}")
    return value


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{name} must be true or false, got {raw!r}")


# The same, from the process environment, for commands: a malformed value ends the command with its message.


def env_int(name: str, default: int) -> int:
    return _or_exit(parse_int, name, default)


def env_float(name: str, default: float) -> float:
    return _or_exit(parse_float, name, default)


def env_bool(name: str, default: bool) -> bool:
    return _or_exit(parse_bool, name, default)


def _or_exit(parse: Callable[[Mapping[str, str], str, T], T], name: str, default: T) -> T:
    try:
        return parse(os.environ, name, default)
    except SettingError as e:
        raise SystemExit(f"gpuq: {e}") from None


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
