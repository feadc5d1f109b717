"""Local directory storage: the default, for development and for single-machine setups.

Outputs are copied under the root directory and addressed by file:// URLs. A plain file has no
content-type metadata; the key's extension carries it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.errors import ErrorCode, JobError

DEFAULT_DIR = Path(".gpuq/outputs")


def local_path_from_url(url: str) -> Path:
    """An absolute path from `file:///abs/path` or `/abs/path`; anything else is INPUT_INVALID."""
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise JobError(ErrorCode.INPUT_INVALID, f"file URL names a remote host: {url}")
        path = Path(unquote(parts.path))
    else:
        path = Path(url)
    if not path.is_absolute():
        raise JobError(ErrorCode.INPUT_INVALID, f"local input paths must be absolute: {url}")
    return path


def copy_local(src: Path, dest: Path, max_bytes: int) -> Path:
    """Copy a local file to `dest`, refusing missing files, directories and files over max_bytes."""
    if not src.is_file():
        raise JobError(ErrorCode.INPUT_INVALID, f"no such file: {src}")
    size = src.stat().st_size
    if size > max_bytes:
        raise JobError(ErrorCode.INPUT_INVALID, f"{src} is {size} bytes, over the limit of {max_bytes}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(src, dest)
    except OSError as e:
        raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"copying {src}: {e}") from e
    return dest


class LocalStorage:
    scheme = "file"

    def __init__(self, root: Path | str = DEFAULT_DIR) -> None:
        self.root = Path(root).resolve()

    def path_for(self, key: str) -> Path:
        """Where `key` lives; keys that would leave the root (.., absolute) are refused."""
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid storage key: {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, path: Path, content_type: str) -> str:
        try:
            dest = self.path_for(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Copy then rename, so a reader never sees a half-written output.
            tmp = dest.with_name(f".{dest.name}.part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except (OSError, ValueError) as e:
            raise JobError(ErrorCode.UPLOAD_FAILED, f"storing {key} under {self.root}: {e}") from e
        return dest.as_uri()

    def get(self, url: str, dest: Path, max_bytes: int) -> Path:
        return copy_local(local_path_from_url(url), dest, max_bytes)
