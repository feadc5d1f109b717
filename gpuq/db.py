"""Connections: the server at DATABASE_URL, or an embedded Postgres (the `pgserver` wheel) by default."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from psycopg.rows import dict_row

from gpuq.settings import Settings

log = logging.getLogger("gpuq.db")

Connection = psycopg.Connection[dict[str, Any]]


# URL form: scheme://user:PASSWORD@host, up to the last "@" (a password may hold one unencoded).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")
# Keyword (DSN) form, URL query parameters and PGPASSWORD: password=pw, password='a b', ?sslpassword=pw.
_KEY_PASSWORD = re.compile(r"(\b(?:pg|ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]+)", re.IGNORECASE)


def redact(url: str) -> str:
    """A database URL or connection string fit for logs: every password replaced by ***, in the URL
    form (`postgresql://user:pw@host/db`, `?password=pw`) and the keyword form (`host=h password=pw`)."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))


def embedded_url(settings: Settings) -> str:
    """Start (or join) the embedded Postgres under data_dir/pgdata and answer its URL.

    pgserver keeps one server per data directory and stops it when the last process using it exits.
    """
    import pgserver  # imported here: only the embedded default needs it

    pgdata = settings.data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return str(server.get_uri())


def database_url(settings: Settings) -> str:
    return settings.database_url or embedded_url(settings)


def connect(
    url: str, settings: Settings, *, autocommit: bool = True, application_name: str = "gpuq"
) -> Connection:
    """One connection as gpuq uses them: autocommit (each SQL function is its own transaction), rows as
    dicts, and no prepared statements through a transaction pooler (they break there)."""
    conn = psycopg.connect(
        url,
        autocommit=autocommit,
        row_factory=dict_row,
        prepare_threshold=None if settings.transaction_pooler else 5,
        application_name=application_name,
    )
    return conn
