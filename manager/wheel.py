"""The wheel of the gpuq the manager runs, so that a rented machine installs exactly that code.

Built here from the running packages (gpuq, worker, manager) and the workflows the worker reads beside
them, rather than by setuptools: the setuptools build leaves workflows/ out (the ComfyUI backend needs
them on the host), and this one is reproducible, so the same tree always gives the same sha256 and a
cron tick does not upload a new file every minute. Real pip installs it (tests/manager/test_install.py).

    python -m manager.wheel DIR   writes the wheel into DIR and prints its path and sha256
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gpuq

ROOT = Path(gpuq.__file__).resolve().parent.parent  # where gpuq/, worker/, manager/, workflows/ lie
TOP_LEVEL = ("gpuq", "worker", "manager", "workflows")
NAME = "gpuq"
_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold: no build time in the file


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def _requirements() -> list[str]:
    """The running tree's requirements.txt when it has one (a checkout), else the installed metadata's."""
    req = ROOT / "requirements.txt"
    if req.is_file():
        lines = (line.split("#", 1)[0].strip() for line in req.read_text().splitlines())
        return [line for line in lines if line and not line.startswith("-")]
    return list(importlib.metadata.requires(NAME) or [])


def _files() -> list[tuple[str, Path]]:
    """(name in the wheel, file) for every file of the running packages; no caches, no hidden files."""
    found = []
    for top in TOP_LEVEL:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if not path.is_file() or "__pycache__" in rel.parts or path.suffix == ".pyc":
                continue
            if any(part.startswith(".") for part in rel.parts):
                continue
            found.append((rel.as_posix(), path))
    return found


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dest_dir: Path) -> Wheel:
    """Write gpuq-<version>-py3-none-any.whl into dest_dir; the same tree gives the same bytes."""
    version = gpuq.__version__
    dist_info = f"{NAME}-{version}.dist-info"
    metadata = "".join(
        [
            "Metadata-Version: 2.1\n",
            f"Name: {NAME}\n",
            f"Version: {version}\n",
            "Summary: GPU inference jobs as rows in Postgres, run on rented GPUs\n",
            "Requires-Python: >=3.11\n",
            *(f"Requires-Dist: {r}\n" for r in _requirements()),
        ]
    )
    entries: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _files()]
    entries += [
        (f"{dist_info}/METADATA", metadata.encode()),
        (
            f"{dist_info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: gpuq manager.wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (f"{dist_info}/entry_points.txt", b"[console_scripts]\ngpuq = gpuq.cli:main\n"),
    ]
    record = "".join(f"{name},{_digest(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))

    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"{NAME}-{version}-py3-none-any.whl"
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, _DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    tmp.replace(path)
    return Wheel(path, hashlib.sha256(path.read_bytes()).hexdigest())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m manager.wheel DIR", file=sys.stderr)
        return 2
    wheel = build_wheel(Path(argv[0]))
    print(f"{wheel.path}\nsha256 {wheel.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
