"""A storage's credentials when they are this instance's own: issued by the manager, read from the database.

With GPUQ_STORAGE_CREDENTIALS=instance (the manager sets it on the hosts it rents when it issues
credentials: manager/credentials.py), S3 and Supabase storage hold no long-lived key. The manager gives
each live instance short-lived credentials of its own (S3 keys from STS, a Supabase Storage JWT) and
renews them each tick while plenty of their life is left; the worker reads them with its instance secret
(gpuq.instance_credentials), once at first use and again only when the ones it holds come near their
expiry, never per upload. A worker that cannot read new ones keeps using those it holds while they last.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from gpuq.client import IssuedCredentials

log = logging.getLogger("gpuq.worker")

# Fetches this instance's current credentials of one kind from the database (None: none issued).
CredentialsFetch = Callable[[str], IssuedCredentials | None]

# Fetch new credentials once less than this share of their lifetime is left. The manager renews them when
# half is left (manager/credentials.py RENEW_SHARE), so by then new ones are normally waiting.
REFRESH_SHARE = 0.25
MIN_REFRESH_MARGIN_S = 60.0  # at least this long before expiry, whatever the lifetime
RETRY_S = 30.0  # while no newer ones are there, look again after this long, not on every request


class CredentialsUnavailable(Exception):
    """No usable credentials: none issued yet, or expired and none newer, or the database unreachable."""


class InstanceCredentials:
    """This instance's credentials of one kind, cached until they near expiry. Thread-safe: one fetch at a
    time, and only when due, so a fetch function may use one database connection of its own."""

    def __init__(self, kind: str, *, clock: Callable[[], float] = time.time) -> None:
        self.kind = kind
        self.clock = clock
        self._fetch: CredentialsFetch | None = None
        self._held: IssuedCredentials | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def bind(self, fetch: CredentialsFetch) -> None:
        """Where to read them from: set by the worker once it has registered as its instance."""
        with self._lock:
            self._fetch = fetch
            self._held, self._next_try = None, 0.0

    def remaining_s(self, issued: IssuedCredentials) -> float:
        return issued.expires_at.timestamp() - self.clock()

    def margin_s(self, issued: IssuedCredentials) -> float:
        """How long before their expiry new ones are fetched."""
        lifetime = (issued.expires_at - issued.issued_at).total_seconds()
        return max(MIN_REFRESH_MARGIN_S, lifetime * REFRESH_SHARE)

    def current(self) -> IssuedCredentials:
        """Credentials valid now: those held, or new ones from the database when those are near expiry.
        Raises CredentialsUnavailable."""
        with self._lock:
            held = self._held
            if held is not None and not self._due(held):
                return held
            if self.clock() >= self._next_try:
                self._refresh()
            held = self._held
            if held is None or self.remaining_s(held) <= 0:
                raise CredentialsUnavailable(self._why_none())
            return held

    def _due(self, issued: IssuedCredentials) -> bool:
        return self.remaining_s(issued) < self.margin_s(issued)

    def _refresh(self) -> None:
        """Ask the database; keep what is held when it has nothing newer or cannot answer."""
        if self._fetch is None:
            return
        self._next_try = self.clock() + RETRY_S
        try:
            fresh = self._fetch(self.kind)
        except Exception as exc:  # the database down, the instance ended: keep what still works
            log.warning("cannot read this instance's %s credentials from the database: %s", self.kind, exc)
            return
        if fresh is None:
            return
        if self._held is None or fresh.expires_at > self._held.expires_at:
            if self._held is not None:
                log.info("%s credentials renewed, valid until %s", self.kind, _utc(fresh.expires_at))
            self._held = fresh
            if not self._due(fresh):
                self._next_try = 0.0

    def _why_none(self) -> str:
        if self._fetch is None:
            return (
                f"GPUQ_STORAGE_CREDENTIALS=instance, but this storage was never given its instance's "
                f"{self.kind} credentials (only the worker's own output storage gets them)"
            )
        if self._held is None:
            return f"the manager has not issued this instance {self.kind} credentials yet"
        expired = _utc(self._held.expires_at)
        return f"this instance's {self.kind} credentials expired at {expired} and no newer ones were issued"


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
