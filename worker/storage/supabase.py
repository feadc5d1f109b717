"""Supabase Storage through supabase-py's storage client (storage3).

Authenticates with a key, or, on a host the manager rented with Supabase tokens configured, with the
instance's own short-lived JWT (role gpuq_storage_worker: sql/supabase/storage_policies.sql lets it write
only under its queues' folders of the output bucket and read the input buckets), read from the database
and renewed without a restart (worker/storage/credentials.py); the project's public anon (publishable)
key goes with it as `apiKey`. A service-role key bypasses row-level security and never goes to a rented
host. Keys and tokens are never logged. Uploads upsert, so a retried job overwrites its earlier attempt's
output under the same key.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException
from supabase import ClientOptions, create_client

from worker.errors import ErrorCode, JobError
from worker.storage.credentials import CredentialsFetch, CredentialsUnavailable, InstanceCredentials

# Supabase signs with a JWT that has no hard upper limit; a week matches S3's limit.
DEFAULT_EXPIRES_S = 7 * 24 * 3600
_RETRYABLE_STATUS = {"408", "429", "500", "502", "503", "504"}


def split_supabase_url(url: str) -> tuple[str, str]:
    """("bucket", "path") from "supabase://bucket/path"."""
    parts = urlsplit(url)
    path = unquote(parts.path).lstrip("/")
    if parts.scheme != "supabase" or not parts.netloc or not path:
        raise JobError(ErrorCode.INPUT_INVALID, f"not a supabase://bucket/path URL: {url}")
    return parts.netloc, path


def _status(e: StorageApiError) -> str:
    # The server answers most errors with HTTP 400 and puts the meaningful status in the body.
    return str(e.status)


class SupabaseStorage:
    scheme = "supabase"

    def __init__(
        self,
        url: str,
        key: str | None,
        bucket: str,
        prefix: str = "",
        *,
        public: bool = False,
        expires_in: int = DEFAULT_EXPIRES_S,
        credentials: InstanceCredentials | None = None,
    ) -> None:
        """With `credentials`, the instance's own tokens are used and `key` is not (give None)."""
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.public = public
        self.expires_in = expires_in
        self.credentials = credentials
        # Our own httpx client sets the timeouts (supabase-py's timeout arguments are deprecated).
        self._http = httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)
        self._lock = threading.Lock()
        self._token: str | None = None  # the instance token self._storage was made with
        self._storage: Any = None
        if credentials is None:
            if not key:
                raise ValueError("SupabaseStorage needs a key, or instance credentials")
            self._storage = create_client(url, key, ClientOptions(httpx_client=self._http)).storage

    def use_instance_credentials(self, fetch: CredentialsFetch) -> None:
        """Read this instance's token with `fetch` (the worker, once registered); a storage with a key
        ignores it."""
        if self.credentials is not None:
            self.credentials.bind(fetch)

    def _api(self) -> Any:
        """The storage client, with the instance's current token where it has one (a new client each time
        the token is renewed; raises CredentialsUnavailable)."""
        if self.credentials is None:
            return self._storage
        issued = self.credentials.current()
        token, apikey = issued.values["token"], issued.values["apikey"]
        with self._lock:
            if token != self._token:
                options = ClientOptions(httpx_client=self._http, headers={"Authorization": f"Bearer {token}"})
                self._storage, self._token = create_client(self.url, apikey, options).storage, token
            return self._storage

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, path: Path, content_type: str) -> str:
        full_key = self.full_key(key)
        try:
            bucket = self._api().from_(self.bucket)
            bucket.upload(full_key, path, {"content-type": content_type, "upsert": "true"})
            if self.public:
                return bucket.get_public_url(full_key)
            return bucket.create_signed_url(full_key, self.expires_in)["signedURL"]
        except (StorageException, httpx.HTTPError, OSError, ValueError, CredentialsUnavailable) as e:
            raise JobError(
                ErrorCode.UPLOAD_FAILED, f"uploading supabase://{self.bucket}/{full_key}: {e}"
            ) from e

    def get(self, url: str, dest: Path, max_bytes: int) -> Path:
        bucket_name, path = split_supabase_url(url)
        try:
            bucket = self._api().from_(bucket_name)
            # download() reads the whole object into memory, so check the size first.
            size = bucket.info(path).get("size")
            if isinstance(size, int) and size > max_bytes:
                raise JobError(ErrorCode.INPUT_INVALID, f"{url} is {size} bytes, over {max_bytes}")
            data = bucket.download(path)
        except StorageApiError as e:
            status = _status(e)
            if status in _RETRYABLE_STATUS:
                raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"fetching {url}: {e.message}") from e
            # not found, no such bucket, access denied: the payload names something we cannot read
            raise JobError(ErrorCode.INPUT_INVALID, f"fetching {url}: {e.message} ({status})") from e
        except (StorageException, httpx.HTTPError, CredentialsUnavailable) as e:
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"fetching {url}: {e}") from e
        except ValueError as e:  # dot segments in the path
            raise JobError(ErrorCode.INPUT_INVALID, f"{url}: {e}") from e
        if len(data) > max_bytes:
            raise JobError(ErrorCode.INPUT_INVALID, f"{url} is {len(data)} bytes, over {max_bytes}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        except OSError as e:
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"writing {dest}: {e}") from e
        return dest
