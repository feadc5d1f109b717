"""The thin client over gpuq's SQL functions: the only Python that touches the jobs table.

Every state change is one call to one function in sql/. This module adds types, error mapping and
waiting (LISTEN with a polling fallback); it decides nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from gpuq.db import Connection, connect, database_url, redact
from gpuq.migrate import migrate
from gpuq.settings import Settings

log = logging.getLogger("gpuq.client")

FINISHED = ("succeeded", "failed", "cancelled")
JOBS_CHANNEL = "gpuq_jobs"  # payload: queue name; sent on enqueue and whenever a job is queued again
DONE_CHANNEL = "gpuq_done"  # payload: {"id", "status", "queue"}; sent when a job finishes
PROGRESS_CHANNEL = "gpuq_progress"  # payload: {"id", "progress", "message"}


class GpuqError(Exception):
    """A request gpuq refused, with Postgres's own words for why."""


class InvalidRequest(GpuqError):
    """Bad input: a malformed queue name, a payload that is not an object, an absurd value..."""


class JobNotFound(GpuqError):
    pass


class NotHeld(GpuqError):
    """This instance does not hold that job under that lease token (its lease passed, it was released, or
    it was never this instance's)."""


class NotAuthorized(GpuqError):
    """The instance secret is unknown, expired or revoked: the instance ended, or never existed."""


_BY_SQLSTATE: dict[str, type[GpuqError]] = {
    "GQ400": InvalidRequest,
    "GQ404": JobNotFound,
    "GQ409": NotHeld,
    "GQ401": NotAuthorized,
    "23514": InvalidRequest,  # check_violation: the constraint's name says what is wrong
    "23502": InvalidRequest,  # not_null_violation
    "23505": InvalidRequest,  # unique_violation: e.g. a live job with that idempotency key
    "22P02": InvalidRequest,  # invalid_text_representation: e.g. malformed JSON
    "22P05": InvalidRequest,  # untranslatable_character: a NUL (\u0000) in a payload
    "22003": InvalidRequest,  # numeric_value_out_of_range
}


@contextmanager
def sql_errors() -> Iterator[None]:
    """Turn gpuq's refusals into GpuqError subclasses; let everything else (connection loss...) through."""
    try:
        yield
    except psycopg.Error as exc:
        kind = _BY_SQLSTATE.get(exc.sqlstate or "")
        if kind is None:
            raise
        diag = exc.diag
        message = diag.message_primary or str(exc)
        if diag.constraint_name and diag.constraint_name not in message:
            message += f" ({diag.constraint_name})"
        if diag.message_hint:
            message += f"; {diag.message_hint}"
        raise kind(message) from exc


@dataclass(frozen=True)
class Job:
    id: int
    queue: str
    payload: dict[str, Any]
    priority: int
    run_after: datetime
    max_attempts: int
    timeout_seconds: int
    min_vram_mb: int
    idempotency_key: str | None
    status: str
    attempt: int
    releases: int
    instance_id: int | None
    lease_expires_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    progress: int | None
    progress_message: str | None
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    lease_token: UUID | None  # issued by each claim; the holder presents it with every report

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(**{name: row[name] for name in JOB_COLUMNS})

    @classmethod
    def from_tuple(cls, row: Sequence[Any]) -> Job:
        """From values in JOB_COLUMNS order, what JOB_SELECT gives: the claim's path, no dict per row."""
        return cls(*row)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


JOB_COLUMNS = tuple(f.name for f in fields(Job))
# The select list that gives Job.from_tuple its values. status is cast to text: in binary results an enum
# psycopg does not know comes back as bytes.
JOB_SELECT = ", ".join("status::text" if name == "status" else name for name in JOB_COLUMNS)


Held = tuple[int, UUID]  # (job_id, lease_token): a job this instance holds


@dataclass(frozen=True)
class HeartbeatReply:
    cancel: list[Held]  # cancellation requested
    timeout: list[Held]  # ran past its timeout
    lost: list[Held]  # not held by this instance under that token
    drain: bool  # claim nothing more


@dataclass(frozen=True)
class Registration:
    """What the manager set for an instance, as register_instance answers it."""

    instance_id: int
    provider: str
    queues: tuple[str, ...]
    max_concurrency: int
    vram_mb: int
    min_lease_seconds: int
    max_lease_seconds: int


@dataclass(frozen=True)
class IssuedCredentials:
    """Storage credentials the manager issued one instance (sql 0008): S3 keys from STS, or a Supabase
    Storage token. Their values are secret: never in a repr, never logged."""

    kind: str  # "s3", "supabase"
    values: dict[str, Any] = field(repr=False)
    issued_at: datetime
    expires_at: datetime


SECRET_PREFIX = "gpuqi_"


def new_secret() -> str:
    """A new instance secret: 256 random bits. Only its hash is stored."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    """The sha256 the database keeps of an instance secret (the same as SQL's sha256(convert_to(…)))."""
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class Notification:
    channel: str
    payload: str


class Listener:
    """LISTEN on gpuq's channels with reconnect; through a transaction pooler it only sleeps, so
    callers fall back to polling without knowing the difference."""

    def __init__(self, url: str, settings: Settings, channels: Sequence[str]) -> None:
        self.url = url
        self.settings = settings
        self.channels = list(channels)
        self._conn: Connection | None = None

    @property
    def enabled(self) -> bool:
        return not self.settings.transaction_pooler

    def _connect(self) -> Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.url, self.settings)
            for channel in self.channels:
                conn.execute(psycopg.sql.SQL("listen {}").format(psycopg.sql.Identifier(channel)))
            self._conn = conn
        return self._conn

    def start(self) -> None:
        """Listen now, so nothing sent between this call and the first wait() is missed."""
        if self.enabled:
            self._connect()

    def wait(self, timeout: float) -> list[Notification]:
        """Notifications that arrive within `timeout` seconds (returning at the first); [] on timeout."""
        if not self.enabled:
            time.sleep(timeout)
            return []
        try:
            conn = self._connect()
            got = [Notification(n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=1)]
            if got:  # take whatever else is already here without waiting
                got += [Notification(n.channel, n.payload) for n in conn.notifies(timeout=0)]
            return got
        except psycopg.OperationalError as exc:
            log.warning("gpuq: lost the LISTEN connection (%s); reconnecting", exc)
            self.close()
            time.sleep(min(timeout, 1.0))
            return []

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _storable(value: Any) -> Any:
    """`value` with U+0000 replaced by U+FFFD in every string in it, dict keys and nested ones included.

    Postgres text cannot hold U+0000 and jsonb refuses the \\u0000 escape, so a report carrying one (an
    error message read from a binary file, a ComfyUI traceback) would be refused whole, and its job would
    stay running until the lease passed and end without saying why.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def _json(value: dict[str, Any] | None) -> Jsonb | None:
    """A worker's report as jsonb, made storable (`_storable`)."""
    return None if value is None else Jsonb(_storable(value))


class Client:
    """gpuq's SQL API from Python. One connection, autocommit: each call is one transaction."""

    def __init__(self, conn: Connection, url: str, settings: Settings) -> None:
        self.conn = conn
        self.url = url
        self.settings = settings

    @classmethod
    def connect(cls, url: str, settings: Settings | None = None, *, application_name: str = "gpuq") -> Client:
        settings = settings or Settings.from_env()
        return cls(connect(url, settings, application_name=application_name), url, settings)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Run one statement, normally `select … from gpuq.some_function(…)`, as its own transaction;
        gpuq's refusals become GpuqError. The named methods below are the common calls.

        Text parameters are made storable (`_storable`): much of what is stored comes from elsewhere (a
        provider's status message, a backend's error), and one NUL would fail the whole call."""
        if isinstance(params, dict):
            params = {k: _storable(v) if isinstance(v, str) else v for k, v in params.items()}
        else:
            params = [_storable(v) if isinstance(v, str) else v for v in params]
        with sql_errors():
            cur = self.conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    # --- apps -------------------------------------------------------------------------------------

    def enqueue(
        self,
        queue: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        run_after: datetime | None = None,
        max_attempts: int = 3,
        timeout_seconds: int = 3600,
        min_vram_mb: int = 0,
        idempotency_key: str | None = None,
    ) -> int:
        """Queue a job; answers its id (the live job's id when the idempotency key is already live)."""
        if payload is not None and not isinstance(payload, dict):
            raise InvalidRequest(f"payload must be a JSON object, got {type(payload).__name__}")
        rows = self.call(
            "select gpuq.enqueue(%s::text, %s::jsonb, %s::integer, %s::timestamptz, %s::integer, "
            "%s::integer, "
            "%s::integer, %s::text) as id",
            (
                queue,
                Jsonb(payload or {}),  # the app's own input: refused, as by a plain INSERT, never altered
                priority,
                run_after,
                max_attempts,
                timeout_seconds,
                min_vram_mb,
                idempotency_key,
            ),
        )
        return int(rows[0]["id"])

    def cancel(self, job_id: int) -> str:
        """Cancel: queued jobs at once, running ones through their worker. Answers the status now."""
        return str(self.call("select gpuq.cancel_job(%s) as s", (job_id,))[0]["s"])

    def retry(self, job_id: int) -> None:
        self.call("select gpuq.retry_job(%s)", (job_id,))

    def get(self, job_id: int) -> Job:
        rows = self.call("select * from gpuq.jobs where id = %s", (job_id,))
        if not rows:
            raise JobNotFound(f"job {job_id} does not exist")
        return Job.from_row(rows[0])

    def list_jobs(self, *, queue: str | None = None, status: str | None = None, limit: int = 50) -> list[Job]:
        rows = self.call(
            """select * from gpuq.jobs
                where (%(queue)s::text is null or queue = %(queue)s)
                  and (%(status)s::text is null or status = %(status)s::gpuq.job_status)
                order by id desc limit %(limit)s""",
            {"queue": queue, "status": status, "limit": limit},
        )
        return [Job.from_row(r) for r in rows]

    def history(self, job_id: int) -> list[dict[str, Any]]:
        return self.call("select * from gpuq.job_history(%s)", (job_id,))

    def wait(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Block until the job finishes (LISTEN, polling as a fallback); answers the finished job.
        on_progress is called with the job whenever its progress changes. Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = Listener(self.url, self.settings, [DONE_CHANNEL, PROGRESS_CHANNEL])
        listener.start()  # before the first read, so a finish in between is not missed
        seen: tuple[int | None, str | None, str] | None = None
        try:
            while True:
                job = self.get(job_id)
                state = (job.progress, job.progress_message, job.status)
                if on_progress is not None and state != seen:
                    on_progress(job)
                seen = state
                if job.finished:
                    return job
                left = self.settings.poll_seconds if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
                listener.wait(min(left, self.settings.poll_seconds))
        finally:
            listener.close()

    # --- instances (the manager's and operators' side) ------------------------------------------------

    def as_instance(self, secret: str, instance_id: int | None = None) -> InstanceClient:
        """The worker API on this connection, acting as the instance that secret belongs to."""
        return InstanceClient(self, secret, instance_id)

    def enroll(
        self,
        queues: Sequence[str],
        *,
        max_concurrency: int = 1,
        vram_mb: int = 0,
        gpu_name: str | None = None,
        provider: str = "manual",
        valid_for_seconds: float | None = None,
        label: str | None = None,
    ) -> tuple[int, str]:
        """An instance for a worker started by hand: answers its id and its secret (shown only now; the
        database keeps its hash). Needs the manager's rights."""
        secret = new_secret()
        rows = self.call(
            "select gpuq.enroll_instance(%s, %s, %s, %s, %s, %s, make_interval(secs => %s), %s) as id",
            (
                secret_hash(secret),
                list(queues),
                max_concurrency,
                vram_mb,
                gpu_name,
                provider,
                valid_for_seconds,
                label,
            ),
        )
        return int(rows[0]["id"]), secret

    def set_instance_credentials(
        self, instance_id: int, kind: str, values: dict[str, Any], expires_at: datetime
    ) -> bool:
        """Give a live instance its storage credentials of this kind (replacing any); False, storing
        nothing, when the instance has ended or has no secret. Needs the manager's rights."""
        rows = self.call(
            "select gpuq.set_instance_credentials(%s, %s, %s, %s) as stored",
            (instance_id, kind, Jsonb(values), expires_at),
        )
        return bool(rows[0]["stored"])

    def release_instance_jobs(self, instance_id: int) -> int:
        """Hand every job an instance holds back to the queue (the manager, before a destroy)."""
        return int(self.call("select gpuq.release_instance_jobs(%s) as n", (instance_id,))[0]["n"])

    def drain_instance(self, instance_id: int, reason: str | None = None) -> None:
        """The manager asks an instance to drain: it claims nothing more."""
        self.call("select gpuq.drain_instance(%s, %s)", (instance_id, reason))

    # --- operators --------------------------------------------------------------------------------

    def reap_expired(self) -> int:
        return int(self.call("select gpuq.reap_expired() as n")[0]["n"])

    def record_tick(self) -> None:
        """A manager tick that reconciled every provider: the fleet is looked after (see
        manager_silence_seconds)."""
        self.call("select gpuq.record_tick()")

    def prune(self, older_than_seconds: float, batch: int = 10000) -> int:
        """Delete finished jobs older than that, in batches; answers how many went."""
        total = 0
        while True:
            rows = self.call(
                "select gpuq.prune_jobs(make_interval(secs => %s), %s) as n", (older_than_seconds, batch)
            )
            total += int(rows[0]["n"])
            if rows[0]["n"] < batch:
                return total

    def queue_stats(self) -> list[dict[str, Any]]:
        return self.call("select * from gpuq.queue_stats()")

    def instance_stats(self, tz: str = "UTC") -> list[dict[str, Any]]:
        return self.call("select * from gpuq.instance_stats(%s)", (tz,))

    def failure_stats(self, since_seconds: float = 86400) -> list[dict[str, Any]]:
        return self.call("select * from gpuq.failure_stats(make_interval(secs => %s))", (since_seconds,))


def open_client(settings: Settings) -> Client:
    """Connect as the CLI, the manager and the demo do: the embedded database (no DATABASE_URL) is ours and
    is migrated on the way; a real one must have been migrated with `gpuq migrate`."""
    url = database_url(settings)
    client = Client.connect(url, settings)
    if settings.database_url is None:
        migrate(client.conn)
    elif client.conn.execute("select to_regclass('gpuq.jobs') as t").fetchone() == {"t": None}:
        client.close()
        raise SystemExit(f"gpuq: {redact(url)} has no gpuq schema yet; run `gpuq migrate` first")
    return client


class InstanceClient:
    """gpuq's worker API, acting as one instance: every call presents that instance's secret, and the
    database acts for that instance only, on the jobs it holds under their lease tokens."""

    def __init__(self, client: Client, secret: str, instance_id: int | None = None) -> None:
        self.client = client
        self.secret = secret
        self.settings = client.settings
        self.instance_id = instance_id  # known once registered (or when the enrolling caller says)

    def call(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """client.call with the secret as the first parameter."""
        return self.client.call(sql, (self.secret, *params))

    def register(
        self,
        *,
        gpu_name: str | None = None,
        gpu_count: int | None = None,
        vram_mb: int | None = None,
        version: str | None = None,
        hostname: str | None = None,
        new_secret_hash: bytes | None = None,
    ) -> Registration:
        """The instance is ready; answers what the manager set for it. With new_secret_hash the secret
        is replaced (this object's secret is then stale: use the new one)."""
        [row] = self.call(
            "select * from gpuq.register_instance(%s, %s, %s, %s, %s, %s, %s)",
            (gpu_name, gpu_count, vram_mb, version, hostname, new_secret_hash),
        )
        self.instance_id = int(row["instance_id"])
        return Registration(
            instance_id=int(row["instance_id"]),
            provider=row["provider"],
            queues=tuple(row["queues"]),
            max_concurrency=int(row["max_concurrency"]),
            vram_mb=int(row["vram_mb"]),
            min_lease_seconds=int(row["min_lease_seconds"]),
            max_lease_seconds=int(row["max_lease_seconds"]),
        )

    def claim(
        self, queues: Sequence[str] | None = None, limit: int = 1, *, lease_seconds: int | None = None
    ) -> list[Job]:
        """Up to `limit` jobs from those of `queues` the instance serves (None: all it serves)."""
        # tuples in binary (no dict per row, no text parsing of the timestamps), sorted by the server
        with sql_errors(), self.client.conn.cursor(row_factory=tuple_row, binary=True) as cur:
            rows = cur.execute(
                f"select {JOB_SELECT} from gpuq.claim_jobs(%s, %s, %s, %s) "
                "order by priority desc, run_after, id",
                (
                    self.secret,
                    None if queues is None else list(queues),
                    limit,
                    lease_seconds or self.settings.lease_seconds,
                ),
            ).fetchall()
        return [Job.from_tuple(r) for r in rows]

    def heartbeat(
        self,
        held: Sequence[Held] = (),
        metrics: dict[str, Any] | None = None,
        *,
        lease_seconds: int | None = None,
    ) -> HeartbeatReply:
        """Extend the leases of the jobs named (every job this worker holds: one it does not name goes
        back to the queue) and hear what to do."""
        rows = self.call(
            "select * from gpuq.heartbeat(%s, %s, %s::uuid[], %s, %s)",
            (
                [j for j, _ in held],
                [t for _, t in held],
                _json(metrics),
                lease_seconds or self.settings.lease_seconds,
            ),
        )
        by_action: dict[str, list[Held]] = {"cancel": [], "timeout": [], "lost": []}
        drain = False
        for row in rows:
            if row["job_id"] is None:
                drain = drain or row["action"] == "drain"
            else:
                by_action[row["action"]].append((int(row["job_id"]), row["lease_token"]))
        return HeartbeatReply(
            cancel=by_action["cancel"], timeout=by_action["timeout"], lost=by_action["lost"], drain=drain
        )

    def progress(self, job_id: int, token: UUID, percent: int, message: str | None = None) -> None:
        self.call("select gpuq.report_progress(%s, %s, %s, %s, %s)", (job_id, token, percent, message))

    def complete(self, job_id: int, token: UUID, result: dict[str, Any] | None = None) -> None:
        """Mark the attempt succeeded (again, harmlessly, after a lost reply). Raises NotHeld if this
        instance does not hold the job under that token."""
        self.call("select gpuq.complete_job(%s, %s, %s, %s)", (job_id, token, _json(result or {})))

    def complete_many(self, done: Sequence[tuple[int, UUID, dict[str, Any] | None]]) -> list[int]:
        """Complete several attempts in one transaction; answers the job ids not held."""
        results = [None if r is None else json.dumps(_storable(r)) for _, _, r in done]
        rows = self.call(
            # only the ones not completed come back: normally none
            "select job_id from gpuq.complete_jobs(%s, %s, %s::uuid[], %s::jsonb[]) where not completed",
            (
                [j for j, _, _ in done],
                [t for _, t, _ in done],
                None if all(r is None for r in results) else results,  # null: every result is {}
            ),
        )
        return [int(r["job_id"]) for r in rows]

    def fail(
        self,
        job_id: int,
        token: UUID,
        error_code: str,
        message: str,
        *,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> str:
        """Fail the attempt; answers the job's new status (queued again for a retry, failed, cancelled)."""
        rows = self.call(
            "select gpuq.fail_job(%s, %s, %s, %s, %s, %s, %s) as s",
            (job_id, token, str(error_code), message, retryable, _json(details)),
        )
        return str(rows[0]["s"])

    def release(self, held: Sequence[Held]) -> int:
        """Hand these jobs back to the queue (a draining worker); answers how many went back."""
        rows = self.call(
            "select gpuq.release_jobs(%s, %s, %s::uuid[]) as n", ([j for j, _ in held], [t for _, t in held])
        )
        return int(rows[0]["n"])

    def request_drain(self, reason: str | None = None) -> None:
        self.call("select gpuq.request_drain(%s, %s)", (reason,))

    def deregister(self, reason: str = "worker exited") -> int:
        """Leave for good: hand back what is held and give up the secret. Answers the jobs handed back."""
        return int(self.call("select gpuq.deregister_instance(%s, %s) as n", (reason,))[0]["n"])

    def manager_silence_seconds(self) -> float | None:
        """Seconds since a manager last ticked here (None: never): a rented worker's orphan check."""
        value = self.call("select gpuq.manager_silence_seconds(%s) as s")[0]["s"]
        return None if value is None else float(value)

    def credentials(self, kind: str) -> IssuedCredentials | None:
        """This instance's unexpired storage credentials of that kind, as the manager last issued them
        (None: none yet, or they expired)."""
        for row in self.call("select * from gpuq.instance_credentials(%s)"):
            if row["kind"] == kind:
                return IssuedCredentials(kind, row["credentials"], row["issued_at"], row["expires_at"])
        return None
