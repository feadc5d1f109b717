"""Local directory storage: the default, for development and for single-machine setups.

Outputs are copied under the root directory and addressed by file:// URLs. A plain file has no
content-type metadata; the key's extension carries it.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from gpuq.client import IssuedCredentials
from worker.errors import ErrorCode, JobError

DEFAULT_DIR = Path(".gpuq/outputs")
CHUNK = 1024 * 1024


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


def _real_path(fd: int, path: Path) -> Path:
    """Where the open file `fd` really is: Linux names it in /proc; elsewhere `path`, resolved now."""
    proc = f"/proc/self/fd/{fd}"
    return Path(os.path.realpath(proc)) if os.path.islink(proc) else path.resolve()


def copy_local(src: Path, dest: Path, max_bytes: int, check: Callable[[Path], None] | None = None) -> Path:
    """Copy a local file to `dest`, refusing missing files, directories and files over max_bytes.

    The file is opened once and all else is asked of the open file, so swapping it (or a directory on
    its path) for a symlink meanwhile changes nothing: `check` is given the path it really has and may
    refuse it (raise) before a byte is read; the size is the open file's; and the copy stops should the
    file grow past max_bytes.
    """
    # O_NONBLOCK: a FIFO would block the open; it is refused below, as not a regular file
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    )
    try:
        fd = os.open(src, flags)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise JobError(ErrorCode.INPUT_INVALID, f"no such file: {src}") from e
    except ValueError as e:  # a NUL
        raise JobError(ErrorCode.INPUT_INVALID, f"no such file: {str(src)!r}: {e}") from None
    except OSError as e:
        raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"opening {src}: {e}") from e
    try:
        if check is not None:
            check(_real_path(fd, src))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobError(ErrorCode.INPUT_INVALID, f"no such file: {src}")
        if st.st_size > max_bytes:
            raise JobError(
                ErrorCode.INPUT_INVALID, f"{src} is {st.st_size} bytes, over the limit of {max_bytes}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with dest.open("wb") as out:
                written = 0
                while chunk := os.read(fd, min(CHUNK, max_bytes + 1 - written)):
                    written += len(chunk)
                    if written > max_bytes:
                        raise JobError(
                            ErrorCode.INPUT_INVALID, f"{src} grew past the limit of {max_bytes} bytes"
                        )
                    out.write(chunk)
        except JobError:
            dest.unlink(missing_ok=True)
            raise
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"copying {src}: {e}") from e
    finally:
        os.close(fd)
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

    def use_instance_credentials(self, fetch: Callable[[str], IssuedCredentials | None]) -> None:
        pass  # a local directory needs none
