"""The worker: claim jobs, run them on a backend, store their outputs, report, drain.

Threads, sharing one database connection (Db):
  main       the claim loop: waits for a gpuq_jobs NOTIFY (or polls), claims up to the free slots
  slot-N     one per slot (GPUQ_CONCURRENCY per backend): runs one job at a time
  heartbeat  extends leases, reports machine metrics, applies the reply (cancel, timeout, lost, drain)
  spot       (EC2) watches for the interruption notice and starts the drain

The worker acts as one instance, proven by that instance's secret (worker/identity.py), and on each job
under the lease token its claim issued. A job's life here: claim → workdir + JobContext → backend.run
(which fetches its inputs) → upload each output (under a key with the attempt) → complete. A JobError
becomes fail_job with its code; anything else is WORKER_ERROR with the traceback in the job's history. A
complete or fail that cannot reach the database waits in the outbox (worker/outbox.py) and is sent again.
A job this worker no longer holds (lost lease, released while draining) is stopped and never reported on:
another worker owns it now. An instance whose secret is refused has ended: the worker stops.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import queue
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from uuid import UUID

import psycopg

from gpuq import __version__
from gpuq.client import (
    JOBS_CHANNEL,
    Client,
    GpuqError,
    Held,
    InstanceClient,
    InvalidRequest,
    IssuedCredentials,
    Job,
    NotAuthorized,
    NotHeld,
    Registration,
    new_secret,
    secret_hash,
)
from gpuq.settings import Settings
from worker.backends.base import Backend, JobContext
from worker.config import WorkerSettings
from worker.errors import ErrorCode, JobError
from worker.gpu import Probe
from worker.identity import SecretStore
from worker.inputs import fetch_input, output_key
from worker.metrics import WorkerMetrics
from worker.outbox import Outbox, Outcome
from worker.spot import SpotWatcher
from worker.storage.base import Storage

log = logging.getLogger("gpuq.worker")

T = TypeVar("T")

# Why a running job was stopped. The first three are reported (fail_job); the others never are,
# because the job is no longer ours to report on.
CANCEL, TIMEOUT, LOST, RELEASED = "cancel", "timeout", "lost", "released"
SILENT = (LOST, RELEASED)
PENDING = "pending"  # an outcome waiting in the outbox for the database
DB_RETRIES = 3


def _key(secret: str) -> str:
    """A name for this instance's files on disk that does not give its secret away."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


class Db:
    """The worker's one connection to Postgres, shared by all its threads (psycopg serialises their calls),
    acting as this worker's instance (the secret is read at each call: it changes once, at registration).
    It LISTENs for new jobs on the same connection (not through a transaction pooler, which cannot; there
    the worker polls), and is reconnected when it drops (a restart, a network blip). One connection per
    worker is what lets a fleet of hundreds fit a small Postgres (or a pooler's few server connections)."""

    def __init__(self, url: str, settings: Settings, secret: Callable[[], str]) -> None:
        self.url = url
        self.settings = settings
        self.secret = secret
        self._reconnecting = threading.Lock()
        self.client = self._connect()

    @property
    def listens(self) -> bool:
        return not self.settings.transaction_pooler

    def _connect(self) -> Client:
        client = Client.connect(self.url, self.settings, application_name="gpuq worker")
        if self.listens:
            client.conn.execute(f"listen {JOBS_CHANNEL}")
        return client

    def call(self, fn: Callable[[InstanceClient], T]) -> T:
        for attempt in range(DB_RETRIES):
            client = self.client
            try:
                return fn(client.as_instance(self.secret()))
            except psycopg.OperationalError as exc:
                if attempt == DB_RETRIES - 1:
                    raise
                log.warning("database connection lost (%s); reconnecting", exc)
                time.sleep(0.5 * (attempt + 1))
                self._reconnect(client)
        raise AssertionError("unreachable")

    def _reconnect(self, broken: Client) -> None:
        """A new connection in place of `broken`, unless another thread has made one already."""
        with self._reconnecting:
            if self.client is not broken:
                return
            with contextlib.suppress(Exception):
                broken.close()
            try:
                self.client = self._connect()
            except psycopg.OperationalError as again:
                log.warning("reconnect failed: %s", again)

    def wait_for_jobs(self, timeout: float) -> bool:
        """Until a new-jobs notification (True) or `timeout` (False). The connection is held only to read
        what has arrived, never while waiting: the other threads' calls go through meanwhile."""
        if not self.listens:
            time.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        client = self.client
        try:
            while True:
                # notifications read by another thread's call wait in psycopg's backlog: this yields them
                if any(n.channel == JOBS_CHANNEL for n in client.conn.notifies(timeout=0)):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                select.select([client.conn.fileno()], [], [], min(left, 0.25))
        except (psycopg.OperationalError, OSError, ValueError) as exc:  # closed or broken meanwhile
            log.warning("waiting for jobs: %s; reconnecting", exc)
            time.sleep(min(timeout, 0.5))
            self._reconnect(client)
            return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


@dataclass
class Running:
    job: Job
    backend: str
    ctx: JobContext
    claim_seconds: float
    stop: str | None = None  # CANCEL, TIMEOUT, LOST or RELEASED once the job was told to stop
    timings: dict[str, float] = field(default_factory=dict)
    db: Db | None = None  # the connection of the slot running it, for progress reports


class Worker:
    def __init__(
        self,
        url: str,
        settings: Settings,
        config: WorkerSettings,
        backends: dict[str, Backend],
        storage: Storage,
        *,
        probe: Probe | None = None,
    ) -> None:
        self.url = url
        self.settings = settings
        self.config = config
        self.backends = backends
        self.storage = storage
        self.probe = probe or Probe()
        self.metrics = WorkerMetrics()
        gpus = self.probe.gpus()
        self.gpu_name = gpus[0].name if gpus else None
        self.gpu_count = len(gpus) or None
        self.vram_mb = min(g.memory_total_mb for g in gpus) if gpus else None
        self.instance_id: int | None = None
        self.db: Db  # set by run()
        self.secret = config.instance_secret  # replaced at registration (worker/identity.py)
        self.registration: Registration | None = None
        self.lease_seconds = settings.lease_seconds  # within the database's bounds once registered
        self.heartbeat_seconds = config.heartbeat_seconds
        self.outbox = Outbox(config.state_dir / "outbox")
        # per succeeded job: seconds per phase (claim, fetch, inference, upload, complete); for benchmarks
        self.phase_log: collections.deque[dict[str, float]] = collections.deque(maxlen=100_000)

        self._lock = threading.Lock()
        self._running: dict[int, Running] = {}  # job id -> running attempt
        self._busy = dict.fromkeys(config.backends, 0)
        self._inboxes: dict[str, queue.Queue[Running | None]] = {b: queue.Queue() for b in config.backends}
        self._wake = threading.Event()  # a slot freed up or a drain began: the claim loop looks again
        self._drain = threading.Event()
        self._drain_reason = ""
        self._release_now = threading.Event()  # skip what is left of the grace period
        self._shutdown = False  # the instance's secret was refused: it ended; report nothing more
        self._hb_stop = threading.Event()
        # Claims and heartbeats one at a time: a heartbeat names every job held, and a job claimed while
        # one is in flight must not be missing from it (the database would take it back).
        self._claim_lock = threading.Lock()
        self._pending: dict[int, Outcome] = {}  # job id -> an outcome waiting in the outbox
        self._threads: list[threading.Thread] = []
        # The orphan check (config.orphan_timeout_seconds): when a job last started or ended, when the
        # database last answered a heartbeat, and why this instance is ending itself, if it is.
        self._last_active = time.monotonic()
        self._db_ok_at = time.monotonic()
        self._orphaned: str | None = None

    # -- control ----------------------------------------------------------------------------------

    def request_drain(self, reason: str, *, now: bool = False) -> None:
        """Stop claiming; running jobs get the grace period (none with now=True). Safe from any thread."""
        if not self._drain.is_set():
            self._drain_reason = reason
            log.info("draining: %s", reason)
            self._drain.set()
            self.metrics.draining.set(1)
        if now:
            self._release_now.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain; a second one ends the grace period at once. Main thread only."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            self.request_drain(f"received {name}", now=self._drain.is_set())

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- the whole run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Start backends, register, claim until drained, release what is left, deregister. Answers 0."""
        for name in self.config.backends:
            log.info("starting backend %s", name)
            self.backends[name].start()

        db = Db(self.url, self.settings, lambda: self.secret)  # the one connection: every thread's calls
        self.db = db
        spot: SpotWatcher | None = None
        finished = False  # drained on purpose: leave for good (deregister)
        try:
            self._register(db)
            self.storage.use_instance_credentials(self._storage_credentials)
            if self.config.metrics_port:
                self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
            for backend in self.config.backends:
                self.metrics.slots.labels(backend).set(self.config.concurrency[backend])
                for i in range(self.config.concurrency[backend]):
                    t = threading.Thread(
                        target=self._slot, args=(backend,), name=f"gpuq-slot-{backend}-{i}", daemon=True
                    )
                    t.start()
                    self._threads.append(t)
            hb = threading.Thread(target=self._heartbeat_loop, args=(db,), name="gpuq-heartbeat", daemon=True)
            hb.start()
            if self.config.spot_watch:
                spot = SpotWatcher(
                    lambda notice: self.request_drain(f"spot interruption notice: {notice}"),
                    self.config.spot_metadata_url,
                    self.config.spot_poll_seconds,
                )
                spot.start()
            self._claim_loop(db)
            self._finish(db)
            self._hb_stop.set()
            hb.join(5)
            finished = True
        finally:
            self._hb_stop.set()
            if spot is not None:
                spot.stop()
            for inbox in self._inboxes.values():
                for _ in range(self.config.max_concurrency):
                    inbox.put(None)
            if finished and self.instance_id is not None and not self._shutdown:
                # Leaving for good. (After a crash the instance stays: a restarted worker takes it up again,
                # and the jobs the crashed one held go back to the queue when it registers.)
                self._flush_outbox(db)
                try:
                    n = db.call(lambda c: c.deregister(self._drain_reason or "worker exited"))
                    if n:
                        log.info("deregistered; %d job(s) handed back", n)
                    self._forget_instance()
                except Exception as exc:
                    log.error("deregister failed: %s (the manager's reconciliation will catch up)", exc)
            db.close()
            for b in self.backends.values():
                try:
                    b.close()
                except Exception as exc:
                    log.warning("closing backend %s: %s", b.name, exc)
            self.probe.close()
            if self._orphaned:
                self._self_terminate()
        return 0

    # -- identity ---------------------------------------------------------------------------------

    def _register(self, db: Db) -> None:
        """Become the instance: enroll (no secret given: only a login with the manager's rights may), or
        take up the manager's instance with the secret it gave, waiting while the manager has not yet
        recorded the rent; replace that secret with a new one (worker/identity.py)."""
        if not self.config.instance_secret:
            self._enroll_self(db)
        self.outbox = Outbox(
            self.config.state_dir / f"outbox-{_key(self.config.instance_secret or self.secret)}"
        )
        report = {
            "gpu_name": self.gpu_name,
            "gpu_count": self.gpu_count,
            "vram_mb": self.vram_mb,
            "version": __version__,
            "hostname": socket.gethostname(),
        }
        deadline = time.monotonic() + self.config.register_wait_seconds
        while True:
            try:
                reg = self._register_once(db, report)
                break
            except NotAuthorized:
                if time.monotonic() >= deadline or self._drain.is_set():
                    raise SystemExit(
                        "gpuq worker: the database refuses this instance's secret (GPUQ_INSTANCE_SECRET): "
                        "its instance ended, or it was never recorded"
                    ) from None
                log.info(
                    "this instance is not recorded yet (the manager records a rent after creating it); "
                    "waiting"
                )
                self._drain.wait(2.0)
        self.registration = reg
        self.instance_id = reg.instance_id
        self.lease_seconds = min(
            max(self.settings.lease_seconds, reg.min_lease_seconds), reg.max_lease_seconds
        )
        if self.lease_seconds != self.settings.lease_seconds:
            log.warning(
                "GPUQ_LEASE_SECONDS=%s is outside the database's bounds; leases are %s s",
                self.settings.lease_seconds,
                self.lease_seconds,
            )
        if self.heartbeat_seconds >= self.lease_seconds / 2:
            self.heartbeat_seconds = self.lease_seconds / 4
        served = [q for q in reg.queues if q in self.config.queues]
        missing = [q for q in reg.queues if q not in self.config.queues]
        if missing:
            log.error(
                "instance %s serves %s, but GPUQ_QUEUES has no backend for %s",
                reg.instance_id,
                ", ".join(reg.queues),
                ", ".join(missing),
            )
        log.info(
            "registered as instance %s: serves %s, %s job(s) at once",
            reg.instance_id,
            ", ".join(served) or "nothing this worker runs",
            reg.max_concurrency,
        )

    def _register_once(self, db: Db, report: dict[str, Any]) -> Registration:
        """Find the secret that works (the rotated one on disk, else the given one), send what an earlier
        worker of this instance left in the outbox, then register with a new secret. NotAuthorized: none
        works (yet)."""
        if not self.config.instance_secret:  # enrolled just now: nothing to rotate, nothing to keep
            self._flush_outbox(db)
            return db.call(lambda c: c.register(**report))
        store = SecretStore(self.config.state_dir, self.config.instance_secret)
        for candidate in store.candidates():
            try:  # a call that changes nothing, to find the secret that works
                db.call(lambda c, s=candidate: c.client.as_instance(s).manager_silence_seconds())
            except NotAuthorized:
                store.save([s for s in store.stored() if s != candidate])
                continue
            self.secret = candidate
            self._flush_outbox(db)
            stored = store.stored()
            fresh = new_secret()
            store.save([fresh, *stored])  # before the call that may install it
            try:
                fresh_hash = secret_hash(fresh)
                reg = db.call(lambda c, h=fresh_hash: c.register(**report, new_secret_hash=h))
            except NotAuthorized:  # ended in between
                store.save([s for s in stored if s != candidate])
                continue
            store.save([fresh])
            self.secret = fresh
            return reg
        raise NotAuthorized("no stored or given secret is accepted")

    def _forget_instance(self) -> None:
        """The instance has ended: its kept secret is dead and its outbox delivered; leave no files behind."""
        if self.config.instance_secret:
            SecretStore(self.config.state_dir, self.config.instance_secret).path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.outbox.directory.rmdir()  # only when empty: an undelivered outcome stays

    def _storage_credentials(self, kind: str) -> IssuedCredentials | None:
        """This instance's own storage credentials, which the storage asks for only when those it holds
        near expiry (worker/storage/credentials.py), on the worker's one connection."""
        return self.db.call(lambda c: c.credentials(kind))

    def _enroll_self(self, db: Db) -> None:
        try:
            _, self.secret = db.client.enroll(
                list(self.config.queues),
                max_concurrency=self.config.max_concurrency,
                vram_mb=self.vram_mb or 0,
                gpu_name=self.gpu_name,
                provider=self.config.provider,
            )
        except psycopg.errors.InsufficientPrivilege:
            raise SystemExit(
                "gpuq worker: GPUQ_INSTANCE_SECRET is not set, and this database login may not enroll an "
                "instance itself; an operator runs `gpuq enroll --queues QUEUE,...` and gives this worker "
                "the secret it prints"
            ) from None

    # -- claiming ---------------------------------------------------------------------------------

    def _claim_loop(self, db: Db) -> None:
        assert self.instance_id is not None
        while not self._drain.is_set():
            claimed = 0
            free_any = False
            for backend in self.config.backends:
                with self._lock:
                    free = self.config.concurrency[backend] - self._busy[backend]
                if free <= 0 or self._drain.is_set():
                    continue
                started = time.monotonic()
                try:
                    with self._claim_lock:  # claimed and dispatched before any heartbeat's list is made
                        jobs = db.call(
                            lambda c, b=backend, n=free: c.claim(
                                self.config.queues_of(b), n, lease_seconds=self.lease_seconds
                            )
                        )
                        claim_seconds = time.monotonic() - started
                        for job in jobs:
                            self._dispatch(job, backend, claim_seconds)
                except NotAuthorized:
                    self._ended()
                    break
                except (psycopg.Error, GpuqError) as exc:
                    log.error("claim failed: %s", exc)
                    self._drain.wait(1.0)
                    continue
                self.metrics.claims.labels(backend).inc()
                claimed += len(jobs)
                if len(jobs) < free:
                    free_any = True
            if claimed and not free_any:
                continue  # every slot asked for got a job: there may be more, and no slot is free anyway
            if free_any and not claimed:
                self._wait_for_work(db)
            elif not free_any:
                self._wake.wait(self.settings.poll_seconds)  # all slots busy: wait for one to free up
                self._wake.clear()

    def _wait_for_work(self, db: Db) -> None:
        """Until a NOTIFY, the poll interval, or a drain: in short waits, so a signal is seen quickly."""
        deadline = time.monotonic() + self.settings.poll_seconds
        while not self._drain.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or db.wait_for_jobs(min(left, 0.25)):
                return

    def _dispatch(self, job: Job, backend: str, claim_seconds: float) -> None:
        assert job.lease_token is not None
        token = job.lease_token
        workdir = self.config.work_dir / f"{job.id}-{job.attempt}"
        running: Running
        timings: dict[str, float] = {"fetch": 0.0}

        def fetch(ref: str) -> Path:
            started = time.monotonic()
            try:
                return fetch_input(
                    ref,
                    workdir / "inputs",
                    max_bytes=self.config.input_max_bytes,
                    timeout_s=self.config.input_timeout_seconds,
                    storages={self.storage.scheme: self.storage},
                    input_dirs=self.config.input_dirs,
                    input_buckets=self.config.input_buckets,
                    allow_private=self.config.input_allow_private,
                )
            finally:
                timings["fetch"] += time.monotonic() - started

        def progress(percent: int, message: str | None = None) -> None:
            db = running.db
            if db is None or running.stop in SILENT:
                return
            try:
                db.call(lambda c: c.progress(job.id, token, int(percent), message))
            except NotHeld:
                # another worker has it now: stop, and report nothing more
                running.stop = running.stop or LOST
                running.ctx.cancelled.set()
            except (psycopg.Error, GpuqError) as exc:
                log.warning("job %s: progress not recorded: %s", job.id, exc)

        ctx = JobContext(
            job_id=job.id,
            attempt=job.attempt,
            queue=job.queue,
            payload=dict(job.payload),
            workdir=workdir,
            deadline=time.monotonic() + job.timeout_seconds,
            cancelled=threading.Event(),
            report_progress=progress,
            fetch_input=fetch,
        )
        running = Running(job, backend, ctx, claim_seconds, timings=timings)
        with self._lock:
            self._running[job.id] = running
            self._busy[backend] += 1
            self._last_active = time.monotonic()
            self.metrics.running.labels(backend).set(self._busy[backend])
        self.metrics.claimed.labels(job.queue).inc()
        self.metrics.phase.labels(job.queue, "claim").observe(claim_seconds)
        log.info("job %s (%s, attempt %s) claimed for %s", job.id, job.queue, job.attempt, backend)
        self._inboxes[backend].put(running)

    # -- running ----------------------------------------------------------------------------------

    def _slot(self, backend: str) -> None:
        inbox = self._inboxes[backend]
        while (running := inbox.get()) is not None:
            try:
                running.db = self.db
                self._run_job(self.db, running)
            except Exception:
                log.exception("job %s: the slot failed outside the job", running.job.id)
            finally:
                with self._lock:
                    self._running.pop(running.job.id, None)
                    self._busy[backend] -= 1
                    self._last_active = time.monotonic()
                    self.metrics.running.labels(backend).set(self._busy[backend])
                self._wake.set()

    def _run_job(self, db: Db, r: Running) -> None:
        job, ctx = r.job, r.ctx
        outcome = "succeeded"
        try:
            ctx.workdir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            result = self.backends[r.backend].run(ctx)
            run_seconds = time.monotonic() - started - r.timings["fetch"]
            if r.stop == CANCEL:  # finished anyway, but the app asked for it to be cancelled
                raise JobError(ErrorCode.CANCELLED, "cancelled on request")
            if r.stop in SILENT:
                outcome = r.stop
                log.info("job %s finished after it was %s; not reporting it", job.id, r.stop)
                return
            started = time.monotonic()
            now = datetime.now(UTC)
            outputs = []
            for out in result.outputs:
                key = output_key(job.queue, job.id, out.name, now, attempt=job.attempt)
                url = self.storage.put(key, out.path, out.content_type)
                outputs.append(
                    {
                        "name": out.name,
                        "url": url,
                        "content_type": out.content_type,
                        "bytes": out.path.stat().st_size,
                    }
                )
            upload_seconds = time.monotonic() - started
            # the outputs are stored: free the disk before the job is seen as done (finally: the error paths)
            shutil.rmtree(ctx.workdir, ignore_errors=True)
            metrics: dict[str, Any] = dict(result.metrics)
            metrics.setdefault("inference_seconds", round(run_seconds, 4))
            metrics |= {
                "claim_seconds": round(r.claim_seconds, 4),
                "fetch_seconds": round(r.timings["fetch"], 4),
                "run_seconds": round(run_seconds, 4),
                "upload_seconds": round(upload_seconds, 4),
            }
            if r.stop in SILENT:
                outcome = r.stop
                return
            started = time.monotonic()
            token = job.lease_token
            assert token is not None
            try:
                done = Outcome(
                    "complete", job.id, token, job.queue, {"result": {"outputs": outputs, "metrics": metrics}}
                )
                status = self._report(db, done)
            except InvalidRequest as exc:  # e.g. a result over the size limit: the job fails, clearly
                outcome = self._fail(
                    db, r, ErrorCode.WORKER_ERROR, f"the result was refused: {exc}", False, None
                )
                return
            if status != "succeeded":
                outcome = status
                return
            complete_seconds = time.monotonic() - started
            self.phase_log.append(
                {
                    "claim": r.claim_seconds,
                    "fetch": r.timings["fetch"],
                    "inference": run_seconds,
                    "upload": upload_seconds,
                    "complete": complete_seconds,
                }
            )
            q = job.queue
            self.metrics.phase.labels(q, "fetch").observe(r.timings["fetch"])
            self.metrics.phase.labels(q, "inference").observe(run_seconds)
            self.metrics.phase.labels(q, "upload").observe(upload_seconds)
            self.metrics.phase.labels(q, "complete").observe(complete_seconds)
            log.info(
                "job %s succeeded: fetch %.3fs, inference %.3fs, upload %.3fs, complete %.3fs",
                job.id,
                r.timings["fetch"],
                run_seconds,
                upload_seconds,
                complete_seconds,
            )
        except JobError as exc:
            code, message = exc.code, exc.message
            if r.stop == TIMEOUT and code == ErrorCode.CANCELLED:
                code, message = ErrorCode.TIMEOUT, f"ran past its timeout of {job.timeout_seconds} s"
            elif r.stop == CANCEL and code in (ErrorCode.TIMEOUT, ErrorCode.CANCELLED):
                code, message = ErrorCode.CANCELLED, "cancelled on request"
            retryable = exc.retryable if code == exc.code else None
            outcome = self._fail(db, r, code, message, retryable, exc.details or None)
        except Exception as exc:
            outcome = self._fail(
                db,
                r,
                ErrorCode.WORKER_ERROR,
                f"{type(exc).__name__}: {exc}"[:1000],
                None,
                {"traceback": traceback.format_exc()},
            )
        finally:
            self.metrics.jobs.labels(job.queue, outcome).inc()
            shutil.rmtree(ctx.workdir, ignore_errors=True)

    def _fail(
        self,
        db: Db,
        r: Running,
        code: ErrorCode,
        message: str,
        retryable: bool | None,
        details: dict[str, Any] | None,
    ) -> str:
        job = r.job
        if r.stop in SILENT:
            log.info("job %s stopped (%s): %s; not reporting it", job.id, r.stop, message)
            return r.stop or LOST
        assert job.lease_token is not None
        args = {"error_code": str(code), "message": message, "retryable": retryable, "details": details}
        status = self._report(db, Outcome("fail", job.id, job.lease_token, job.queue, args))
        if status in (LOST, PENDING):
            return status
        log.log(
            logging.ERROR if code == ErrorCode.WORKER_ERROR else logging.WARNING,
            "job %s %s: %s: %s%s",
            job.id,
            "queued again" if status == "queued" else status,
            code,
            message,
            "\n" + details["traceback"] if details and "traceback" in details else "",
        )
        return "retried" if status == "queued" else status

    # -- reporting --------------------------------------------------------------------------------

    def _report(self, db: Db, outcome: Outcome) -> str:
        """Send a complete or fail. Answers the job's status now (succeeded, queued, failed, cancelled),
        LOST when this instance does not hold it, or PENDING when the database cannot be reached: the
        outcome then waits in the outbox and is sent again after a heartbeat gets through."""
        try:
            return self._send(db, outcome)
        except psycopg.OperationalError as exc:
            self.outbox.put(outcome)
            with self._lock:
                self._pending[outcome.job_id] = outcome
            log.warning(
                "job %s: the database cannot take its %s now (%s); kept on disk and sent again",
                outcome.job_id,
                outcome.kind,
                exc,
            )
            return PENDING

    def _send(self, db: Db, o: Outcome) -> str:
        """One report (with Db's reconnects); psycopg.OperationalError when the database is unreachable."""
        try:
            if o.kind == "complete":
                db.call(lambda c: c.complete(o.job_id, o.token, o.args["result"]))
                return "succeeded"
            a = o.args
            return db.call(
                lambda c: c.fail(
                    o.job_id,
                    o.token,
                    a["error_code"],
                    a["message"],
                    retryable=a["retryable"],
                    details=a["details"],
                )
            )
        except NotHeld as exc:
            log.warning("job %s: its %s was refused: no longer ours (%s)", o.job_id, o.kind, exc)
            return LOST
        except NotAuthorized:
            log.warning("job %s: its %s was refused: this instance has ended", o.job_id, o.kind)
            return LOST

    def _flush_outbox(self, db: Db) -> None:
        """Send what waits in the outbox, until the database is unreachable again."""
        for o in self.outbox.pending():
            try:
                status = self._send(db, o)
            except psycopg.OperationalError:
                return
            except InvalidRequest as exc:
                log.error("job %s: its kept %s is refused for good: %s", o.job_id, o.kind, exc)
                status = LOST
            self.outbox.remove(o)
            with self._lock:
                self._pending.pop(o.job_id, None)
            log.info("job %s: its kept %s is delivered (%s)", o.job_id, o.kind, status)

    def _ended(self) -> None:
        """The database refuses this instance's secret: the instance ended (destroyed, failed, lost,
        deregistered, or its enrolment expired). Stop at once; nothing of ours may be reported any more."""
        if self._shutdown:
            return
        self._shutdown = True
        log.error("the database no longer accepts this instance's secret: its instance has ended; stopping")
        with self._lock:
            for r in self._running.values():
                r.stop = r.stop if r.stop in SILENT else LOST
                r.ctx.cancelled.set()
        if self.config.self_terminate_cmd and not self._orphaned:
            self._orphaned = "its instance ended"  # the machine too: nobody may use it now
        self.request_drain("its instance ended", now=True)

    # -- heartbeat --------------------------------------------------------------------------------

    def _stop_job(self, job_id: int, token: UUID | None, reason: str) -> None:
        with self._lock:
            r = self._running.get(job_id)
        if r is None or r.job.lease_token != token:
            return
        if r.stop is None or reason in SILENT:  # a lost lease overrides a cancel: nothing may be reported
            r.stop = reason
        r.ctx.cancelled.set()
        log.info("job %s: stopping (%s)", job_id, reason)

    def _heartbeat_loop(self, db: Db) -> None:
        while not self._hb_stop.wait(self.heartbeat_seconds):
            self.beat(db)

    def beat(self, db: Db) -> None:
        assert self.instance_id is not None
        with self._lock:
            overdue = [
                (r.job.id, r.job.lease_token)
                for r in self._running.values()
                if r.stop is None and time.monotonic() > r.ctx.deadline
            ]
        for job_id, token in overdue:  # our own clock says so, whatever the database does
            self._stop_job(job_id, token, TIMEOUT)
        sample = self.probe.sample()
        self.metrics.observe_sample(sample)
        try:
            with self._claim_lock:  # every job held is in the list: one missing would be taken back
                held = self._held()
                sample |= {
                    "running": len(held),
                    "slots": self.config.max_concurrency,
                    "draining": self._drain.is_set(),
                }
                reply = db.call(lambda c: c.heartbeat(held, sample, lease_seconds=self.lease_seconds))
        except NotAuthorized:
            self._ended()
            return
        except (psycopg.Error, GpuqError) as exc:
            self.metrics.heartbeats.labels("error").inc()
            log.error("heartbeat failed: %s", exc)
            self._check_orphaned(None, idle=not held)
            return
        self.metrics.heartbeats.labels("ok").inc()
        self._db_ok_at = time.monotonic()
        if self._pending:  # the database answers again: what waits in the outbox gets its answer now
            self._flush_outbox(db)
        timeout = self.config.orphan_timeout_seconds
        if timeout and not held and time.monotonic() - self._last_active >= timeout:
            # only then can the manager's silence matter: a busy worker does not ask every heartbeat
            try:
                silence = db.call(lambda c: c.manager_silence_seconds())
            except (psycopg.Error, GpuqError) as exc:
                log.warning("could not read the manager's last tick: %s", exc)
            else:
                self._check_orphaned(math.inf if silence is None else silence, idle=not held)
        for job_id, token in reply.cancel:
            self._stop_job(job_id, token, CANCEL)
        for job_id, token in reply.timeout:
            self._stop_job(job_id, token, TIMEOUT)
        for job_id, token in reply.lost:
            self._stop_job(job_id, token, LOST)
        if reply.drain:
            self.request_drain("the manager asked this instance to drain")

    def _held(self) -> list[Held]:
        """Every (job, lease token) this worker holds: running and not given up, or with an outcome
        waiting in the outbox."""
        with self._lock:
            held = [(r.job.id, r.job.lease_token) for r in self._running.values() if r.stop not in SILENT]
            held += [o.held for o in self._pending.values()]
        return [(j, t) for j, t in dict(held).items() if t is not None]

    def _check_orphaned(self, manager_silence: float | None, *, idle: bool) -> None:
        """End this instance if no one looks after it: no manager tick and no job for the orphan
        timeout, or no database for that long (its jobs' leases have passed; another worker has them).
        manager_silence: seconds since the last tick (inf: never); None: the database did not answer."""
        timeout = self.config.orphan_timeout_seconds
        if not timeout or self._orphaned:
            return
        now = time.monotonic()
        if manager_silence is None:
            if now - self._db_ok_at < timeout:
                return
            why = f"the database has not answered for {now - self._db_ok_at:.0f} s"
        else:
            idle_for = now - self._last_active
            if not (idle and manager_silence >= timeout and idle_for >= timeout):
                return
            last = f"no manager tick for {manager_silence:.0f} s"
            if math.isinf(manager_silence):
                last = "no manager ever ticked"
            why = f"{last} and no job for {idle_for:.0f} s"
        self._orphaned = f"orphaned: {why}"
        log.error("%s; ending this instance (GPUQ_SELF_TERMINATE_CMD) so it stops billing", self._orphaned)
        self.request_drain(self._orphaned, now=True)

    def _self_terminate(self) -> None:
        """Run the provider's way of ending this machine (on Vast a destroy of this instance, on EC2 a
        shutdown that terminates it); the worker exits whatever it answers."""
        cmd = self.config.self_terminate_cmd
        log.error("running GPUQ_SELF_TERMINATE_CMD")
        try:
            done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("GPUQ_SELF_TERMINATE_CMD failed: %s", exc)
            return
        out = (done.stdout + done.stderr).strip()[-2000:]
        level = logging.ERROR if done.returncode else logging.INFO
        log.log(level, "GPUQ_SELF_TERMINATE_CMD exited with %s%s", done.returncode, f": {out}" if out else "")

    # -- draining ---------------------------------------------------------------------------------

    def _finish(self, db: Db) -> None:
        """Running jobs get the grace period; what still runs after it goes back to the queue."""
        assert self.instance_id is not None
        if not self._shutdown:
            try:
                db.call(lambda c: c.request_drain(self._drain_reason))
            except (psycopg.Error, GpuqError) as exc:
                log.warning("could not mark the instance draining: %s", exc)
        grace = self.config.drain_grace_seconds
        with self._lock:
            n = len(self._running)
        if n:
            log.info("waiting up to %gs for %d running job(s)", grace, n)
        deadline = time.monotonic() + grace
        while not self._release_now.is_set():
            with self._lock:
                if not self._running:
                    break
            if time.monotonic() >= deadline:
                break
            self._wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self._wake.clear()
        with self._lock:
            left = list(self._running.values())
            for r in left:
                r.stop = RELEASED  # first, so the slot reports nothing once its backend stops
        if left and not self._shutdown:
            held = [(r.job.id, r.job.lease_token) for r in left if r.job.lease_token is not None]
            try:
                n = db.call(lambda c: c.release(held))
                log.info("released %d job(s) back to the queue", n)
            except (psycopg.Error, GpuqError) as exc:
                log.error("release failed: %s (their leases will expire instead)", exc)
            for r in left:
                r.ctx.cancelled.set()
            # give backends a moment to stop cleanly (ComfyUI interrupts its prompt); not more
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                with self._lock:
                    if not self._running:
                        break
                self._wake.wait(0.1)
                self._wake.clear()
