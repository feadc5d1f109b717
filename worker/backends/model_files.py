"""F5-TTS model files (checkpoint, vocabulary, vocoder) from a path, an http(s) URL or an s3:// object.

A remote file is downloaded once into the cache directory, under its sha256, and checked against the sha256
the operator configured: a file that does not match is deleted and the worker does not start. A later start
finds it in the cache (checked again, and downloaded again if damaged) and downloads nothing. A local
path is used where it is; its sha256 is checked when one is configured.

The vocoder is a directory (config.yaml + pytorch_model.bin); remotely it is a .tar or .tar.gz archive of
those two files, unpacked next to the archive in the cache.

A download is refused when it is larger than `max_bytes` (known from its length before reading, or once
that many bytes have come) or takes longer than `deadline_s` in all. Files are written under a name of their
own (mkstemp) and renamed into place when whole, so processes sharing one cache never write into one file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from worker.errors import ErrorCode, JobError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
VOCODER_FILES = ("config.yaml", "pytorch_model.bin")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_BYTES = 20 * 10**9  # F5TTS_MODEL_MAX_BYTES: the Spanish checkpoint is 1.35 GB, the vocoder 54 MB
DEADLINE_S = 2 * 3600.0  # F5TTS_MODEL_DOWNLOAD_TIMEOUT_S: per file, in all


class _Refused(Exception):
    """A download went over its byte cap or its deadline."""


class _CappedWriter:
    """Writes to `out` until `max_bytes` have come or the deadline passes, then refuses."""

    def __init__(self, out: BinaryIO, max_bytes: int, deadline_s: float) -> None:
        self.out = out
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s
        self.written = 0

    def check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise _Refused(
                f"it is {size} bytes, more than the limit of {self.max_bytes} (F5TTS_MODEL_MAX_BYTES)"
            )

    def write(self, block: bytes) -> int:
        self.written += len(block)
        if self.written > self.max_bytes:
            raise _Refused(
                f"it is more than the limit of {self.max_bytes} bytes (F5TTS_MODEL_MAX_BYTES); stopped there"
            )
        if time.monotonic() > self.deadline:
            raise _Refused(
                f"it took more than {self.deadline_s:g} s (F5TTS_MODEL_DOWNLOAD_TIMEOUT_S);"
                f" stopped after {self.written} bytes"
            )
        return self.out.write(block)


def _unavailable(message: str) -> JobError:
    return JobError(ErrorCode.BACKEND_UNAVAILABLE, message)


def is_remote(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "s3")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelFiles:
    cache_dir: Path
    s3_endpoint_url: str | None = None  # a stand-in or S3-compatible store; None: AWS
    timeout_s: float = 60.0  # for each read
    max_bytes: int = MAX_BYTES  # for each file
    deadline_s: float = DEADLINE_S  # for each file, in all

    def file(self, label: str, source: str, sha256: str | None) -> Path:
        """The local path of `source`, downloaded and checked if it is remote."""
        sha256 = (sha256 or "").strip().lower() or None
        if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
            raise _unavailable(f"the sha256 of the F5-TTS {label} must be 64 hex digits, got {sha256!r}")
        if not is_remote(source):
            path = Path(source)
            if not path.is_file():
                raise _unavailable(f"F5-TTS {label} {source} does not exist")
            if sha256 is not None:
                self._check(label, source, path, sha256, delete=False)
            return path
        if sha256 is None:
            raise _unavailable(f"the F5-TTS {label} comes from {source}: its sha256 must be configured too")
        name = Path(urlparse(source).path).name or label.replace(" ", "_")
        path = self.cache_dir / sha256 / name
        if path.is_file():
            if sha256_of(path) == sha256:
                log.info("F5-TTS %s: %s from the cache", label, path)
                return path
            log.warning("F5-TTS %s: the cached %s is damaged; downloading it again", label, path)
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                self._download(label, source, out)
            self._check(label, source, tmp, sha256, delete=True)
            tmp.replace(path)  # whole and checked, or not there at all
        finally:
            tmp.unlink(missing_ok=True)
        log.info("F5-TTS %s: downloaded %s (%d bytes)", label, source, path.stat().st_size)
        return path

    def vocoder_dir(self, source: str, sha256: str | None) -> Path:
        """A vocoder directory: `source` itself when it is one, else an archive fetched and unpacked."""
        if not is_remote(source) and Path(source).is_dir():
            missing = [f for f in VOCODER_FILES if not (Path(source) / f).is_file()]
            if missing:
                raise _unavailable(f"no Vocos vocoder ({' + '.join(VOCODER_FILES)}) in {source}")
            return Path(source)
        if not source.endswith(ARCHIVE_SUFFIXES):
            files = " + ".join(VOCODER_FILES)
            raise _unavailable(
                f"the F5-TTS vocoder {source} must be a directory or a .tar/.tar.gz of {files}"
            )
        archive = self.file("vocoder", source, sha256)
        target = self.cache_dir / (sha256 or sha256_of(archive)) / "vocoder"
        if all((target / f).is_file() for f in VOCODER_FILES):
            return target
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for name in VOCODER_FILES:
                member = next((m for m in tar.getmembers() if Path(m.name).name == name and m.isfile()), None)
                if member is None:
                    raise _unavailable(f"the F5-TTS vocoder archive {source} holds no {name}")
                extracted = tar.extractfile(member)
                assert extracted is not None
                fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{name}.")
                tmp = Path(tmp_name)
                try:
                    with os.fdopen(fd, "wb") as out:
                        while block := extracted.read(CHUNK):
                            out.write(block)
                    tmp.replace(target / name)
                finally:
                    tmp.unlink(missing_ok=True)
        return target

    def _check(self, label: str, source: str, path: Path, sha256: str, *, delete: bool) -> None:
        got = sha256_of(path)
        if got != sha256:
            if delete:
                path.unlink(missing_ok=True)
            raise _unavailable(f"F5-TTS {label} {source} has sha256 {got}, not the configured {sha256}")

    def _download(self, label: str, source: str, out: BinaryIO) -> None:
        url = urlparse(source)
        capped = _CappedWriter(out, self.max_bytes, self.deadline_s)
        try:
            if url.scheme == "s3":
                import boto3

                client = boto3.client("s3", endpoint_url=self.s3_endpoint_url)
                bucket, key = url.netloc, url.path.lstrip("/")
                capped.check_size(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
                client.download_fileobj(bucket, key, capped)
            else:
                import requests

                with requests.get(source, stream=True, timeout=self.timeout_s) as response:
                    response.raise_for_status()
                    length = response.headers.get("Content-Length", "")
                    if length.isdigit():
                        capped.check_size(int(length))
                    # small reads: each blocks until it is full, and the deadline is checked between them
                    for block in response.iter_content(1 << 16):
                        capped.write(block)
        except _Refused as exc:
            raise _unavailable(f"refused to download the F5-TTS {label} from {source}: {exc}") from exc
        except Exception as exc:
            raise _unavailable(f"cannot download the F5-TTS {label} from {source}: {exc}") from exc
