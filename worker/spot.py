"""The EC2 Spot interruption notice, through IMDSv2: AWS gives a two-minute warning at
/latest/meta-data/spot/instance-action (404 until then). When it appears the worker drains."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import requests

log = logging.getLogger(__name__)

TOKEN_TTL_SECONDS = 21600  # the longest IMDSv2 allows; the token is renewed well before it lapses


class SpotWatcher:
    def __init__(
        self,
        on_notice: Callable[[str], None],
        base_url: str = "http://169.254.169.254",
        interval: float = 5.0,
        timeout: float = 2.0,
    ) -> None:
        self.on_notice = on_notice
        self.base_url = base_url.rstrip("/")
        self.interval = interval
        self.timeout = timeout
        self.session = requests.Session()
        self._token: str | None = None
        self._token_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpuq-spot", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)

    def _token_header(self) -> dict[str, str]:
        if self._token is None or time.monotonic() - self._token_at > TOKEN_TTL_SECONDS / 2:
            r = self.session.put(
                f"{self.base_url}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
                timeout=self.timeout,
            )
            r.raise_for_status()
            self._token, self._token_at = r.text.strip(), time.monotonic()
        return {"X-aws-ec2-metadata-token": self._token}

    def check(self) -> str | None:
        """The notice's action ("terminate", "stop", "hibernate") if one is posted, else None."""
        r = self.session.get(
            f"{self.base_url}/latest/meta-data/spot/instance-action",
            headers=self._token_header(),
            timeout=self.timeout,
        )
        if r.status_code == 401:  # token expired or revoked: get a new one next time
            self._token = None
            return None
        if r.status_code == 404:
            return None
        r.raise_for_status()
        try:
            notice = json.loads(r.text)
            return f"{notice.get('action', 'interruption')} at {notice.get('time', '?')}"
        except (ValueError, AttributeError):
            return r.text.strip()[:200] or "interruption"

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                notice = self.check()
                failures = 0
            except requests.RequestException as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:  # say it, without flooding the log
                    log.warning("spot watcher: instance metadata unreachable (%s)", exc)
                notice = None
            if notice is not None:
                log.warning("spot interruption notice: %s; draining", notice)
                self.on_notice(notice)
                return
            self._stop.wait(self.interval)
