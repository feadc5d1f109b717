"""Apply the versioned migrations in sql/migrations, once each, safely from several processes at once.

Each file is `NNNN_name.sql`. Versions applied are recorded in gpuq.schema_migrations with a checksum;
a file changed after it was applied is an error, not a silent skip. One advisory lock serialises
migrators: a second one waits, then finds everything applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from gpuq.db import Connection

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "migrations"
LOCK_KEY = 0x67707571  # "gpuq": the advisory lock every migrator takes


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", path.name)
        if not match:
            raise MigrationError(f"migration file name {path.name!r} is not NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {directory}")
    return migrations


def migrate(conn: Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply what is missing, all in one transaction. Answers the migrations applied now."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now = []
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute("create schema if not exists gpuq")
        conn.execute(
            """create table if not exists gpuq.schema_migrations (
                   version integer primary key,
                   name text not null,
                   checksum text not null,
                   applied_at timestamptz not null default now())"""
        )
        conn.execute("alter table gpuq.schema_migrations enable row level security")
        rows = conn.execute("select version, name, checksum from gpuq.schema_migrations").fetchall()
        done = {row["version"]: row for row in rows}
        for migration in migrations:
            row = done.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "insert into gpuq.schema_migrations (version, name, checksum) values (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration)
        conn.execute(LOCK_DOWN)
    return applied_now


# Supabase's API roles (where they exist) and PUBLIC lose every right in schema gpuq: gpuq's own roles
# (gpuq_app, gpuq_worker, gpuq_manager) are what apps, workers and managers are granted.
LOCK_DOWN = """
do $$
declare
    r text;
begin
    revoke all on schema gpuq from public;
    revoke all on all tables in schema gpuq from public;
    revoke all on all sequences in schema gpuq from public;
    revoke execute on all functions in schema gpuq from public;
    foreach r in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on schema gpuq from %I', r);
            execute format('revoke all on all tables in schema gpuq from %I', r);
            execute format('revoke all on all sequences in schema gpuq from %I', r);
            execute format('revoke execute on all functions in schema gpuq from %I', r);
        end if;
    end loop;
end $$
"""
