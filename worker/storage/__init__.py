"""Where outputs go and inputs come from. One file per storage kind, each a `Storage`.

`storage_from_url` picks the kind from one URL (GPUQ_STORAGE_URL in the worker):

- a plain path, or `file:///dir` (empty: `./.gpuq/outputs`): `LocalStorage`.
- `s3://bucket/prefix`: `S3Storage`; endpoint from GPUQ_S3_ENDPOINT_URL or AWS_ENDPOINT_URL (unset: AWS),
  region from AWS_REGION, credentials the standard AWS way.
- `supabase://bucket/prefix`: `SupabaseStorage`; SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY.

GPUQ_STORAGE_CREDENTIALS=instance (set by the manager on the hosts it rents when it issues credentials):
S3 and Supabase storage use only this instance's own short-lived credentials, read from the database
(worker/storage/credentials.py), never keys from the environment; Supabase needs SUPABASE_URL alone.

Query options, both remote kinds: `public=true` (return a public URL instead of a signed one) and
`expires_in=SECONDS` (signed URL lifetime); S3 only: `public_base_url=https://cdn.example.com/path`
(implies public), for R2 public domains or a CDN in front of the bucket.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlsplit

from gpuq.settings import parse_bool
from worker.storage.base import Storage
from worker.storage.credentials import InstanceCredentials
from worker.storage.local import DEFAULT_DIR, LocalStorage, local_path_from_url

__all__ = ["Storage", "storage_from_url"]


def storage_from_url(url: str) -> Storage:
    """The storage kind a URL names, configured from it and the environment. Raises ValueError."""
    url = url.strip()
    if not url:
        return LocalStorage(DEFAULT_DIR)
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return LocalStorage(local_path_from_url(url) if parts.scheme == "file" else url)

    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    bucket, prefix = parts.netloc, unquote(parts.path).strip("/")
    if not bucket:
        raise ValueError(f"storage URL names no bucket: {url}")
    public = parse_bool(query, "public", False)  # a typo is an error, not "private"
    expires = int(query["expires_in"]) if "expires_in" in query else None
    mode = (os.environ.get("GPUQ_STORAGE_CREDENTIALS") or "environment").strip().lower()
    if mode not in ("instance", "environment"):
        raise ValueError(f"GPUQ_STORAGE_CREDENTIALS must be instance or environment, got {mode!r}")
    own = InstanceCredentials(parts.scheme) if mode == "instance" else None

    if parts.scheme == "s3":
        from worker.storage.s3 import MAX_PRESIGN_SECONDS, S3Storage

        return S3Storage(
            bucket,
            prefix,
            endpoint_url=os.environ.get("GPUQ_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL"),
            public=public,
            public_base_url=query.get("public_base_url"),
            expires_in=expires or MAX_PRESIGN_SECONDS,
            credentials=own,
        )
    if parts.scheme == "supabase":
        from worker.storage.supabase import DEFAULT_EXPIRES_S, SupabaseStorage

        supabase_url = os.environ.get("SUPABASE_URL")
        key = None if own else os.environ.get("SUPABASE_SERVICE_ROLE_KEY")
        if not supabase_url or not (key or own):
            raise ValueError("supabase:// storage needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        return SupabaseStorage(
            supabase_url,
            key,
            bucket,
            prefix,
            public=public,
            expires_in=expires or DEFAULT_EXPIRES_S,
            credentials=own,
        )
    raise ValueError(
        f"unknown storage URL scheme {parts.scheme!r} (use a path, file://, s3:// or supabase://)"
    )
