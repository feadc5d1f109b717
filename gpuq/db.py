"""Connections: the server at DATABASE_URL, or an embedded Postgres (the `pgserver` wheel) by default.

A database that goes silent must not stall its caller. Every connection gives up connecting after
CONNECT_TIMEOUT_S, and has TCP keepalives and a TCP user timeout, so a peer that stops answering (a network
black hole, a host that vanished) breaks the connection instead of leaving a read waiting for ever; the
URL's own settings for these win. A caller that must never wait long for one statement (the manager: a
stuck tick bills unseen) also sets a deadline: `connect(..., timeout_s=)` or `set_deadline()`. Each
`execute` that has not answered by then has its socket shut down from a watchdog thread, and fails with
DatabaseTimeout (an OperationalError: the connection is broken, reconnect); the server is asked to give up
such statements too (statement_timeout, and server-side keepalives, except through a transaction pooler,
where session settings do not stay with the session). A deadline is never the default: `gpuq migrate`
waits on other migrators' lock, a worker waits on LISTEN.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from gpuq.settings import Settings, quiet_runtime_dir_warning

log = logging.getLogger("gpuq.db")

Connection = psycopg.Connection[dict[str, Any]]

CONNECT_TIMEOUT_S = 10
TCP_USER_TIMEOUT_MS = 30_000  # unacknowledged data this long: the peer is gone
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


class DatabaseTimeout(psycopg.OperationalError):
    """A statement got no answer within the connection's deadline; the connection is broken."""


class GpuqConnection(psycopg.Connection[DictRow]):
    """A psycopg connection whose `execute` honours `deadline_s` (None: waits as long as it takes)."""

    deadline_s: float | None = None

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool = False
    ) -> Any:
        deadline = self.deadline_s
        if deadline is None:
            return super().execute(query, params, prepare=prepare, binary=binary)
        with _Watchdog(self, deadline):
            return super().execute(query, params, prepare=prepare, binary=binary)


class _Watchdog:
    """Shuts the connection's socket down if the statement outlives `seconds`: the blocked read then
    returns at once, and psycopg raises. (Closing the connection from another thread is not safe; a
    shutdown of the socket is.)"""

    def __init__(self, conn: GpuqConnection, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self.fired = False
        self._armed = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._armed = True
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self.fired = True
            try:
                sock = socket.socket(fileno=os.dup(self.conn.fileno()))
            except (OSError, psycopg.Error):
                return
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        with self._lock:
            self._armed = False
        self._timer.cancel()
        if self.fired and isinstance(exc, psycopg.OperationalError):
            raise DatabaseTimeout(f"the database did not answer within {self.seconds:g} s") from exc


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

    pgserver keeps one server per data directory, with the pids of the processes using it in
    pgdata/.handle_pids.json, and stops it when the last of them exits. A process that died without
    leaving (killed) would keep it running for ever, so dead pids are dropped on the way in and out; a
    pid now held by a process that started after the user recorded under it is dead too. That list is
    changed only under one lock file beside pgdata, which pgserver takes as well (_get_server).
    """
    pgdata = embedded_pgdata(settings.data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _drop_dead_users(pgdata)
    server = _get_server(pgdata)
    _record_user(pgdata, os.getpid())
    # atexit runs last-registered first: this runs before pgserver's own exit hook, so that hook sees
    # only the users still alive, and stops the server when this process was the last.
    if pgdata not in _joined:
        _joined.add(pgdata)
        atexit.register(_leave, pgdata)
    return str(server.get_uri())


_joined: set[Path] = set()


def embedded_pgdata(data_dir: Path) -> Path:
    return (data_dir / "pgdata").resolve()


def share_embedded(data_dir: Path, pid: int) -> None:
    """Count process `pid` (a local worker this process started) as a user of the embedded server under
    `data_dir`, so the server outlives this process while the worker needs it. The worker joins it
    itself when it starts (embedded_url) and leaves it when it exits; this closes the gap before that."""
    _record_user(embedded_pgdata(data_dir), pid)


def _pgserver() -> Any:
    quiet_runtime_dir_warning()  # pgserver's import asks platformdirs for the runtime dir
    import pgserver.postgres_server  # imported here: only the embedded default needs it

    return pgserver.postgres_server


def _embedded_lock(pgdata: Path) -> Any:
    """The lock around the list of users of the server at `pgdata`, for pgserver and for us.

    pgserver's own lock file is under the user's runtime dir, which moves with XDG_RUNTIME_DIR: a cron
    tick (unset) and a shell (set) would each take a different one. This one is beside pgdata, the same
    for every process. One lock object per file: closing any handle on a file drops the process's lock."""
    if pgdata not in _locks:
        import fasteners

        _locks[pgdata] = fasteners.InterProcessLock(pgdata.parent / "pgserver.lock")
    return _locks[pgdata]


_locks: dict[Path, Any] = {}


@functools.cache
def _server_class() -> type:
    class EmbeddedServer(_pgserver().PostgresServer):  # type: ignore[misc, name-defined]
        """pgserver's server with our lock in place of its own (it takes it to start, join and leave)."""

        @property
        def _lock(self) -> Any:
            return _embedded_lock(self.pgdata)

    return EmbeddedServer


def _get_server(pgdata: Path) -> Any:
    """pgserver.get_server(pgdata, cleanup_mode="stop"), with the lock beside pgdata."""
    server_class = _server_class()
    pgdata.mkdir(exist_ok=True)
    known = server_class._instances.get(pgdata)  # pgserver's one handle per pgdata in this process
    return known if known is not None else server_class(pgdata, cleanup_mode="stop")


def _users_file(pgdata: Path) -> Path:
    return pgdata / ".handle_pids.json"  # pgserver 0.1.4's list of users (requirements.txt pins it)


def _starts_file(pgdata: Path) -> Path:
    # Our own record beside pgserver's list (whose format holds only pids): when each user started, so a
    # pid the system gave to a new process after the user died is not taken for the user.
    return pgdata / ".gpuq_user_starts.json"


def _read_users(pgdata: Path) -> tuple[list[int], dict[int, float]]:
    """The users' pids and their recorded start times, under the lock. A damaged list (a write cut
    short) is rebuilt from our record rather than failing every command that needs the database."""
    try:
        starts = {int(p): float(t) for p, t in json.loads(_starts_file(pgdata).read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        starts = {}
    users = _users_file(pgdata)
    if not users.exists():
        return [], starts
    try:
        pids = [int(p) for p in json.loads(users.read_text())]
    except (ValueError, TypeError):
        log.warning("%s is unreadable; rebuilding it from %s", users, _starts_file(pgdata).name)
        pids = list(starts)
        users.write_text(json.dumps(pids))
    return pids, starts


def _write_users(pgdata: Path, pids: list[int], starts: dict[int, float]) -> None:
    _users_file(pgdata).write_text(json.dumps(pids))
    kept = {str(p): starts[p] for p in pids if p in starts}
    _starts_file(pgdata).write_text(json.dumps(kept))


def _record_user(pgdata: Path, pid: int) -> None:
    import psutil

    with _embedded_lock(pgdata):
        pids, starts = _read_users(pgdata)
        with contextlib.suppress(psutil.Error):  # gone already: listed all the same, dropped next time
            starts[pid] = _started(psutil.Process(pid))
        _write_users(pgdata, pids if pid in pids else [*pids, pid], starts)


def _leave(pgdata: Path) -> None:
    """At exit, before pgserver's own hook takes this pid off the list: drop the dead users, and our
    record (so that a later process given this pid is not checked against this one's start)."""
    if not _users_file(pgdata).exists():
        return
    with _embedded_lock(pgdata):
        pids, starts = _read_users(pgdata)
        starts.pop(os.getpid(), None)
        _write_users(pgdata, [p for p in pids if p == os.getpid() or _running(p, starts.get(p))], starts)


def _drop_dead_users(pgdata: Path) -> None:
    if not _users_file(pgdata).exists():
        return
    with _embedded_lock(pgdata):
        pids, starts = _read_users(pgdata)
        alive = [p for p in pids if _running(p, starts.get(p))]
        if alive != pids:
            _write_users(pgdata, alive, starts)


def _running(pid: int, started: float | None) -> bool:
    """Whether `pid` still runs as the process recorded with start time `started` (None: no record)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # 1.5 s: the boot time psutil reads is whole seconds off the clock, and may move by one.
        return started is None or abs(_started(process) - started) < 1.5
    except psutil.Error:
        return False


def _started(process: Any) -> float:
    """When `process` started, in seconds after boot: unlike its start by the clock, this does not move
    when the clock is set."""
    import psutil

    return float(process.create_time() - psutil.boot_time())


def database_url(settings: Settings) -> str:
    return settings.database_url or embedded_url(settings)


def _network_settings(url: str, timeout_s: float | None) -> dict[str, Any]:
    """Connect timeout, keepalives and TCP user timeout, where the URL (or PGCONNECT_TIMEOUT) sets none."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return {}  # psycopg.connect will say what is wrong with it
    wanted: dict[str, Any] = dict(KEEPALIVES)
    connect_s = CONNECT_TIMEOUT_S if timeout_s is None else min(CONNECT_TIMEOUT_S, math.ceil(timeout_s))
    wanted["connect_timeout"] = max(2, connect_s)  # libpq takes less than 2 as 2
    wanted["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS if timeout_s is None else int(timeout_s * 1000)
    if os.environ.get("PGCONNECT_TIMEOUT"):
        wanted.pop("connect_timeout")
    return {k: v for k, v in wanted.items() if k not in given}


def connect(
    url: str,
    settings: Settings,
    *,
    autocommit: bool = True,
    timeout_s: float | None = None,
    application_name: str = "gpuq",
) -> Connection:
    """One connection as gpuq uses them: autocommit (each SQL function is its own transaction), rows as
    dicts, and no prepared statements through a transaction pooler (they break there). `timeout_s`: the
    deadline of every statement (see the module's notes); None waits as long as a statement takes."""
    conn = GpuqConnection.connect(
        url,
        autocommit=autocommit,
        row_factory=dict_row,
        prepare_threshold=None if settings.transaction_pooler else 5,
        application_name=application_name,
        **_network_settings(url, timeout_s),
    )
    if timeout_s is not None:
        try:
            set_deadline(conn, timeout_s, settings)
        except BaseException:
            conn.close()
            raise
    return conn


def set_deadline(conn: Connection, seconds: float | None, settings: Settings) -> None:
    """Give every later statement on `conn` at most `seconds` (None: no limit), and ask the server to
    give up such statements and dead clients too (not through a transaction pooler)."""
    if not isinstance(conn, GpuqConnection):
        raise TypeError("set_deadline needs a connection made by gpuq.db.connect")
    conn.deadline_s = seconds
    if seconds is None or settings.transaction_pooler:
        return
    ms = max(1, int(seconds * 1000))
    was = conn.autocommit
    if not was and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return  # inside someone's transaction: leave its session settings alone
    conn.autocommit = True
    try:
        conn.execute(f"set statement_timeout = {ms}")
        # A client the network lost (its tick lock held in an open transaction) is noticed by the server.
        conn.execute("set tcp_keepalives_idle = 10")
        conn.execute("set tcp_keepalives_interval = 5")
        conn.execute("set tcp_keepalives_count = 3")
    finally:
        conn.autocommit = was


def deadline_of(conn: Connection) -> float | None:
    """The statement deadline `conn` was given (None: none)."""
    return getattr(conn, "deadline_s", None)
