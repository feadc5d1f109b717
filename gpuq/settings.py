"""Configuration shared by every gpuq process, from environment variables (and a `.env` file).

The README's configuration table lists every variable; keep the two in step.
"""

from __future__ import annotations

import math
import os
import warnings
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


LOCAL_DATA_DIR = ".gpuq"  # the data directory gpuq used before the per-user default: still used if present


def data_dir_from_env(env: Mapping[str, str] = os.environ) -> tuple[Path, str]:
    """gpuq's data directory, and where that choice came from: GPUQ_DATA_DIR; else a ./.gpuq in the
    current folder (an older default, kept so its database is not silently left behind); else the
    per-user data directory (~/.local/share/gpuq on Linux). Never the current folder by default: the
    same user in another folder must reach the same database."""
    given = (env.get("GPUQ_DATA_DIR") or "").strip()
    if given:
        return Path(given).expanduser().resolve(), "GPUQ_DATA_DIR"
    local = Path(LOCAL_DATA_DIR)
    if local.is_dir():
        return local.resolve(), "./.gpuq in this folder"
    import platformdirs  # a pgserver dependency

    quiet_runtime_dir_warning()
    return Path(platformdirs.user_data_dir("gpuq", appauthor=False)), "the per-user default"


def quiet_runtime_dir_warning() -> None:
    """platformdirs warns on every use when XDG_RUNTIME_DIR is unset (containers, cron, ssh without a
    login session); pgserver still asks for it at import (a socket fallback for long pgdata paths, and a lock
    that gpuq replaces with one beside pgdata: gpuq.db), so the warning says nothing a user can act on."""
    import platformdirs

    category = getattr(platformdirs, "RuntimeDirWarning", None)
    if category is not None:
        warnings.filterwarnings("ignore", category=category)


@dataclass(frozen=True)
class Settings:
    database_url: str | None  # None: start the embedded Postgres under data_dir
    data_dir: Path  # embedded Postgres data, local outputs
    transaction_pooler: bool  # e.g. Supabase's pooler on port 6543: no LISTEN, no prepared statements
    lease_seconds: int
    poll_seconds: float
    data_dir_source: str = "GPUQ_DATA_DIR"  # how data_dir was chosen (data_dir_from_env), for users

    @classmethod
    def from_env(cls) -> Settings:
        load_dotenv(override=False)
        url = os.environ.get("DATABASE_URL") or None
        default_pooler = bool(url) and urlsplit(url).port == 6543
        data_dir, source = data_dir_from_env()
        settings = cls(
            database_url=url,
            data_dir=data_dir,
            data_dir_source=source,
            transaction_pooler=env_bool("GPUQ_TRANSACTION_POOLER", default_pooler),
            lease_seconds=env_int("GPUQ_LEASE_SECONDS", 60),
            poll_seconds=env_float("GPUQ_POLL_SECONDS", 5.0),
        )
        if settings.lease_seconds < 3:
            raise SystemExit("gpuq: GPUQ_LEASE_SECONDS must be at least 3")
        return settings
