"""The seam between the worker and an object store (local directory, S3-compatible, Supabase Storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Storage(Protocol):
    scheme: str  # "file", "s3", "supabase"

    def put(self, key: str, path: Path, content_type: str) -> str:
        """Store a local file under `key` (e.g. "tts/2026-11-22/123/out.wav"); return a URL apps can read
        (signed where the bucket is private). Raise JobError(UPLOAD_FAILED)."""

    def get(self, url: str, dest: Path, max_bytes: int) -> Path:
        """Fetch an object this storage kind addresses into `dest`. Raise JobError(INPUT_FETCH_FAILED),
        or JobError(INPUT_INVALID) when it is larger than max_bytes."""
