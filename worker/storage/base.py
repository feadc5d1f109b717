"""The seam between the worker and an object store (local directory, S3-compatible, Supabase Storage)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gpuq.client import IssuedCredentials


class Storage(Protocol):
    scheme: str  # "file", "s3", "supabase"

    def put(self, key: str, path: Path, content_type: str) -> str:
        """Store a local file under `key` (e.g. "tts/2026-11-22/123/out.wav"); return a URL apps can read
        (signed where the bucket is private). Raise JobError(UPLOAD_FAILED)."""

    def get(self, url: str, dest: Path, max_bytes: int) -> Path:
        """Fetch an object this storage kind addresses into `dest`. Raise JobError(INPUT_FETCH_FAILED),
        or JobError(INPUT_INVALID) when it is larger than max_bytes."""

    def use_instance_credentials(self, fetch: Callable[[str], IssuedCredentials | None]) -> None:
        """Read this instance's own credentials with `fetch` from now on (called once the worker has
        registered as its instance). A storage that was not made for instance credentials ignores it."""
