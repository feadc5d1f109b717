"""Outcomes the database has not taken yet: a complete or fail that could not reach it.

A job's result must not be lost to a database restart or a network blip: the report is written here (one
small JSON file per job and lease token) and sent again until the database answers it, either by taking it
or by refusing it for good (the lease is gone). Sending twice is safe: complete and fail are idempotent for
the token that made them. While a report waits here, the heartbeat keeps naming its job, so the lease
stays ours for as long as the database is reachable enough to hear it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

log = logging.getLogger("gpuq.worker")


@dataclass(frozen=True)
class Outcome:
    kind: str  # "complete" or "fail"
    job_id: int
    token: UUID
    queue: str
    # complete: {"result": {...}}; fail: {"error_code", "message", "retryable", "details"}
    args: dict[str, Any]

    @property
    def held(self) -> tuple[int, UUID]:
        return self.job_id, self.token


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, job_id: int, token: UUID) -> Path:
        return self.directory / f"{job_id}-{token}.json"

    def put(self, outcome: Outcome) -> None:
        """Keep an outcome on disk (atomically; a crash leaves the old file or the new one)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(outcome.job_id, outcome.token)
        tmp = path.with_suffix(".tmp")
        data = asdict(outcome) | {"token": str(outcome.token)}
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def remove(self, outcome: Outcome) -> None:
        self._path(outcome.job_id, outcome.token).unlink(missing_ok=True)

    def pending(self) -> list[Outcome]:
        """Every outcome kept, oldest first; an unreadable file is set aside (renamed .bad), not lost."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                data = json.loads(path.read_text())
                found.append(
                    Outcome(
                        data["kind"], int(data["job_id"]), UUID(data["token"]), data["queue"], data["args"]
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("outbox: %s is unreadable (%s); setting it aside", path, exc)
                path.rename(path.with_suffix(".bad"))
        return found
