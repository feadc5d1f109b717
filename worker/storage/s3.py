"""S3-compatible storage through boto3: AWS S3, Supabase Storage's S3 endpoint, Cloudflare R2, MinIO.

Credentials come the standard boto3 way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the
instance role), or, on a host the manager rented with STS configured, are the instance's own short-lived
keys, read from the database and renewed without a restart (worker/storage/credentials.py). They are never
logged. With an endpoint URL, path-style addressing is used, which every S3-compatible server accepts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import botocore.session
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.credentials import CredentialProvider, CredentialResolver, DeferredRefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import ErrorCode, JobError
from worker.storage.credentials import CredentialsFetch, CredentialsUnavailable, InstanceCredentials

# SigV4 presigned URLs live at most 7 days. (With temporary credentials, such as an instance role's,
# a URL also stops working when those credentials expire.)
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
CHUNK = 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def split_s3_url(url: str) -> tuple[str, str]:
    """("bucket", "key") from "s3://bucket/key"."""
    parts = urlsplit(url)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise JobError(ErrorCode.INPUT_INVALID, f"not an s3://bucket/key URL: {url}")
    return parts.netloc, key


class _InstanceKeys(DeferredRefreshableCredentials):
    """botocore credentials that come from InstanceCredentials: botocore asks for new ones once the held
    ones are within InstanceCredentials' refresh margin of expiry (it reads the database only then), and
    fails a request only when they have expired and none newer can be had."""

    _mandatory_refresh_timeout = 0  # refuse only expired keys; before that, keep using what is held

    def __init__(self, source: InstanceCredentials, clock: Callable[[], float]) -> None:
        self._source = source
        super().__init__(self._metadata, "gpuq-instance", lambda: datetime.fromtimestamp(clock(), UTC))

    def _metadata(self) -> dict[str, str]:
        issued = self._source.current()
        self._advisory_refresh_timeout = self._source.margin_s(issued)
        v = issued.values
        return {
            "access_key": v["access_key_id"],
            "secret_key": v["secret_access_key"],
            "token": v["session_token"],
            "expiry_time": issued.expires_at.isoformat(),
        }


class _InstanceKeysProvider(CredentialProvider):
    """The only place a storage with instance credentials looks for keys: never the environment's."""

    METHOD = CANONICAL_NAME = "gpuq-instance"

    def __init__(self, keys: _InstanceKeys) -> None:
        super().__init__()
        self._keys = keys

    def load(self) -> _InstanceKeys:
        return self._keys


class S3Storage:
    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        public: bool = False,
        public_base_url: str | None = None,
        expires_in: int = MAX_PRESIGN_SECONDS,
        client: Any = None,
        credentials: InstanceCredentials | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.public = public or public_base_url is not None
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.expires_in = min(expires_in, MAX_PRESIGN_SECONDS)
        self.credentials = credentials  # None: boto3's own credentials (environment, profile, role)
        if client is None:
            config = Config(
                signature_version="s3v4",
                s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            session = None
            if credentials is not None:  # never the environment's keys: only this instance's own
                core = botocore.session.Session()
                keys = _InstanceKeys(credentials, credentials.clock)
                resolver = CredentialResolver([_InstanceKeysProvider(keys)])
                core.register_component("credential_provider", resolver)
                session = boto3.Session(botocore_session=core)
            client = (session or boto3).client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1", config=config
            )
        self.client = client

    def use_instance_credentials(self, fetch: CredentialsFetch) -> None:
        """Read this instance's credentials with `fetch` (the worker, once registered); a storage using
        boto3's own credentials ignores it."""
        if self.credentials is not None:
            self.credentials.bind(fetch)

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_for(self, full_key: str) -> str:
        """The URL apps read: a public address for public buckets, else a presigned GET."""
        if not self.public:
            expires = self.expires_in
            if self.credentials is not None:
                # A URL signed with temporary keys stops working when they expire: say so in the URL.
                expires = max(1, min(expires, int(self.credentials.remaining_s(self.credentials.current()))))
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full_key}, ExpiresIn=expires
            )
        path = quote(full_key)
        if self.public_base_url:
            return f"{self.public_base_url}/{path}"
        if self.endpoint_url:
            return f"{self.endpoint_url}/{self.bucket}/{path}"
        return f"https://{self.bucket}.s3.{self.region or 'us-east-1'}.amazonaws.com/{path}"

    def put(self, key: str, path: Path, content_type: str) -> str:
        full_key = self.full_key(key)
        try:
            self.client.upload_file(str(path), self.bucket, full_key, ExtraArgs={"ContentType": content_type})
            return self.url_for(full_key)
        except (Boto3Error, BotoCoreError, ClientError, OSError, CredentialsUnavailable) as e:
            raise JobError(ErrorCode.UPLOAD_FAILED, f"uploading s3://{self.bucket}/{full_key}: {e}") from e

    def get(self, url: str, dest: Path, max_bytes: int) -> Path:
        bucket, key = split_s3_url(url)
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _NOT_FOUND or status == 404:
                raise JobError(ErrorCode.INPUT_INVALID, f"{url} does not exist") from e
            if code == "AccessDenied" or status == 403:
                raise JobError(ErrorCode.INPUT_INVALID, f"{url}: access denied") from e
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"fetching {url}: {e}") from e
        except (BotoCoreError, CredentialsUnavailable) as e:
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"fetching {url}: {e}") from e

        body = obj["Body"]
        try:
            if obj.get("ContentLength", 0) > max_bytes:
                raise JobError(
                    ErrorCode.INPUT_INVALID, f"{url} is {obj['ContentLength']} bytes, over {max_bytes}"
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with dest.open("wb") as f:
                for chunk in body.iter_chunks(CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise JobError(ErrorCode.INPUT_INVALID, f"{url} is over {max_bytes} bytes")
                    f.write(chunk)
        except JobError:
            dest.unlink(missing_ok=True)
            raise
        except (BotoCoreError, OSError) as e:
            dest.unlink(missing_ok=True)
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"fetching {url}: {e}") from e
        finally:
            body.close()
        return dest
