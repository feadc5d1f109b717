"""Fetching a job's inputs (http(s), s3://, supabase://, local paths), checking input images, and naming
outputs."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import requests
import urllib3
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from gpuq.settings import SettingError, parse_int
from worker.errors import ErrorCode, JobError
from worker.storage import storage_from_url
from worker.storage.base import Storage
from worker.storage.local import copy_local, local_path_from_url

CHUNK = 256 * 1024
_RETRYABLE_HTTP = {408, 425, 429}  # and every 5xx
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # never raw in a URL; a NUL cannot even be stored in an error
MAX_REDIRECTS = 5


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Cloud metadata services: an input URL must never reach them, allowed private networks or not (the answer
# would be stored as an output). Most live on link-local addresses (AWS, GCP, Azure, Oracle, Vast hosts:
# 169.254.169.254); the rest: AWS's IPv6 endpoint, Alibaba's, Oracle's legacy one.
_LINK_LOCAL = _networks("169.254.0.0/16", "fe80::/10")
_METADATA = _networks("fd00:ec2::254/128", "100.100.100.200/32", "192.0.0.192/32")
# What inputs reach only with GPUQ_INPUT_ALLOW_PRIVATE, besides whatever `is_global` denies: the
# not-globally-reachable entries of IANA's special-purpose registries, spelled out since `is_global`'s
# ranges changed across Python patch releases (3.11.7 counts 192.0.0.192 and 64:ff9b:1::/48 as global).
_REFUSED = (
    ("loopback", _networks("127.0.0.0/8", "::1/128")),
    ("unspecified", _networks("0.0.0.0/8", "::/128")),  # 0/8 is "this network": 0.0.0.0 is the host itself
    ("multicast", _networks("224.0.0.0/4", "ff00::/8")),
    (
        "private",
        _networks("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "fec0::/10"),
    ),
    (
        "reserved",
        _networks(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # documentation
            "198.51.100.0/24",
            "203.0.113.0/24",
            "192.88.99.0/24",  # 6to4 relay anycast, deprecated
            "198.18.0.0/15",  # benchmarking
            "240.0.0.0/4",  # reserved, and the broadcast address
            "64:ff9b:1::/48",  # local-use NAT64
            "100::/64",  # discard-only
            "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID
            "2001:db8::/32",  # documentation
            "3fff::/20",
            "5f00::/16",  # SRv6 SIDs
        ),
    ),
)
_NAT64 = _networks("64:ff9b::/96", "64:ff9b:1::/48")  # the IPv4 address in the low 32 bits
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated; the same


# Input images: the formats Pillow may open (any other plugin never sees the file: EPS would run
# Ghostscript) and the most pixels across all frames (a 160 KiB PNG can declare 13,000 x 13,000 pixels,
# ~2 GB once decoded into a tensor).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImageLimits:
    formats: tuple[str, ...] = IMAGE_FORMATS  # Pillow's format names
    max_pixels: int = IMAGE_MAX_PIXELS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ImageLimits:
        """GPUQ_IMAGE_FORMATS ("png,jpeg,webp") and GPUQ_IMAGE_MAX_PIXELS; raises SettingError."""
        raw = (env.get("GPUQ_IMAGE_FORMATS") or "").strip()
        formats = IMAGE_FORMATS
        if raw:
            Image.init()
            aliases = {"JPG": "JPEG", "TIF": "TIFF"}
            names = [aliases.get(f.strip().upper(), f.strip().upper()) for f in raw.split(",") if f.strip()]
            unknown = [n for n in names if n not in Image.OPEN]
            if unknown or not names:
                raise SettingError(
                    f"GPUQ_IMAGE_FORMATS must name image formats Pillow reads, e.g. png,jpeg,webp; "
                    f"got {raw!r}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )
            formats = tuple(dict.fromkeys(names))
        max_pixels = parse_int(env, "GPUQ_IMAGE_MAX_PIXELS", IMAGE_MAX_PIXELS)
        if max_pixels < 1:
            raise SettingError(f"GPUQ_IMAGE_MAX_PIXELS must be at least 1, got {max_pixels}")
        return cls(formats, max_pixels)


DEFAULT_IMAGE_LIMITS = ImageLimits()


def check_image(path: Path, limits: ImageLimits, what: str) -> str:
    """The one check of every image a backend decodes or uploads: answers its format ("PNG"), or raises
    INPUT_INVALID unless it is in an allowed format with at most max_pixels across its frames.

    Reads the header only, before anything is decoded; decode it afterwards with
    `Image.open(path, formats=limits.formats)`, so that the file decoded is the format checked.
    """
    allowed = ", ".join(limits.formats)
    over = f"over the limit of {limits.max_pixels} (GPUQ_IMAGE_MAX_PIXELS)"
    try:
        with Image.open(path, formats=limits.formats) as image:
            width, height = image.size
            frames = int(getattr(image, "n_frames", 1))
            fmt = str(image.format)
    except Image.DecompressionBombError:  # Pillow's own limit, past twice its MAX_IMAGE_PIXELS
        raise JobError(ErrorCode.INPUT_INVALID, f"{what} has too many pixels, {over}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise JobError(
            ErrorCode.INPUT_INVALID, f"{what} is not an image in an allowed format ({allowed}): {exc}"
        ) from None
    pixels = width * height * frames
    if pixels > limits.max_pixels:
        shape = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise JobError(ErrorCode.INPUT_INVALID, f"{what} is {shape}, {pixels} pixels, {over}")
    return fmt


def safe_name(name: str, default: str = "file") -> str:
    """A plain file name: path separators and odd characters become "_", no leading dots, <= 200 chars."""
    name = _UNSAFE.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    return name[-200:] or default


def output_key(queue: str, job_id: int, name: str, now: datetime, attempt: int | None = None) -> str:
    """The storage key of one output: "queue/YYYY-MM-DD/job_id/name", the date in UTC; with the attempt,
    "queue/YYYY-MM-DD/job_id/attempt/name", so that an attempt that lost its lease and still uploads
    can never overwrite the output of the attempt that was accepted."""
    if now.tzinfo is not None:
        now = now.astimezone(UTC)
    job = f"{job_id}" if attempt is None else f"{job_id}/{attempt}"
    return f"{safe_name(queue, 'default')}/{now:%Y-%m-%d}/{job}/{safe_name(name, 'output')}"


def _unique_dest(dest_dir: Path, name: str) -> Path:
    """dest_dir/name, or name-1, name-2, ... when a job fetches two inputs with the same name."""
    dest = dest_dir / name
    stem, suffix = dest.stem, dest.suffix
    n = 1
    while dest.exists():
        dest = dest_dir / f"{stem}-{n}{suffix}"
        n += 1
    return dest


def fetch_input(
    ref: str,
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout_s: float,
    storages: Mapping[str, Storage] | None = None,
    input_dirs: Sequence[Path] = (),
    input_buckets: Collection[str] = (),
    allow_private: bool = False,
) -> Path:
    """Fetch the input `ref` names into `dest_dir` and return the local file.

    s3:// and supabase:// go through `storages[scheme]`, or through a storage built from the
    environment when none is given, and only from the buckets `input_buckets` names as
    "scheme://bucket" (none: no bucket inputs). Local paths and file:// are read only from under
    `input_dirs` (none: no local inputs); http(s) never reaches link-local addresses nor cloud metadata,
    nor loopback or private ones unless `allow_private`. Raises JobError: INPUT_INVALID (malformed,
    unknown scheme, not found, refused, too large) or INPUT_FETCH_FAILED (network trouble, timeouts, 5xx:
    worth a retry).
    """
    ref = ref.strip()
    try:
        parts = _split_checked(ref)
    except ValueError as e:
        raise JobError(ErrorCode.INPUT_INVALID, f"malformed input {ref[:200]!r}: {e}") from None
    scheme = parts.scheme.lower()
    name = safe_name(unquote(PurePosixPath(parts.path).name), "input")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = _unique_dest(dest_dir, name)

    if scheme in ("http", "https"):
        return _fetch_http(ref, dest, max_bytes=max_bytes, timeout_s=timeout_s, allow_private=allow_private)
    if scheme in ("", "file"):
        path = _allowed_local_path(ref, input_dirs)
        # checked again on the file as opened: a symlink swapped in meanwhile must not lead out
        return copy_local(path, dest, max_bytes, check=lambda real: _check_local_path(ref, real, input_dirs))
    if scheme in ("s3", "supabase"):
        if not parts.netloc:
            raise JobError(ErrorCode.INPUT_INVALID, f"input URL names no bucket: {ref}")
        _check_bucket(ref, f"{scheme}://{parts.netloc}", input_buckets)
        if {".", ".."} & {*parts.path.split("/"), *unquote(parts.path).split("/")}:
            # S3 keys are literal, but a server or proxy that resolves them would leave the bucket
            raise JobError(ErrorCode.INPUT_INVALID, f"refusing input {ref}: '.' or '..' in the object key")
        found = (storages or {}).get(scheme)
        if found is None:
            try:
                found = storage_from_url(f"{scheme}://{parts.netloc}")
            except ValueError as e:
                raise JobError(ErrorCode.INPUT_INVALID, f"cannot read {scheme}:// inputs: {e}") from e
        return found.get(ref, dest, max_bytes)
    raise JobError(ErrorCode.INPUT_INVALID, f"unsupported input URL scheme {scheme!r}: {ref[:80]}")


def _split_checked(url: str) -> SplitResult:
    """urlsplit, raising ValueError for what no retry could fetch: control characters, a malformed URL
    ("http://[::1/a"), an http(s) host no resolver can look up. For a payload's ref and each redirect."""
    if _CONTROL.search(url):
        raise ValueError("control characters in it")
    parts = urlsplit(url)
    if parts.scheme.lower() in ("http", "https"):
        _check_host(parts.hostname)
    return parts


def _check_host(host: str | None) -> None:
    """Raise ValueError for a host name no resolver can look up, which a retry would only meet again.

    Python's IDNA codec, which urllib3 applies before connecting, refuses an empty label or one over 63
    characters; DNS refuses a name over 253. Non-ASCII names requests encodes itself (IDNA 2008) and
    refuses as InvalidURL, so only ASCII ones are checked here.
    """
    if not host or not host.isascii():
        return
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"host {host[:80]!r} has an empty label or one over 63 characters") from None
    if len(host.rstrip(".")) > 253:
        raise ValueError(f"host name of {len(host)} characters, over 253")


def _check_bucket(ref: str, bucket: str, input_buckets: Collection[str]) -> None:
    """Refuse `bucket` ("s3://name") unless it is one of `input_buckets`.

    The worker's credentials read more than the requesting user may (Supabase's service-role key reads
    every bucket): without this, a payload naming another tenant's object would get it back as an output.
    The bucket compared is the URL's netloc, exactly what the storage kinds read from.
    """
    if bucket not in input_buckets:
        allowed = ", ".join(input_buckets) or "none"
        raise JobError(
            ErrorCode.INPUT_INVALID,
            f"refusing input {ref}: bucket {bucket} is not in GPUQ_INPUT_BUCKETS (now: {allowed})",
        )


def _allowed_local_path(ref: str, input_dirs: Sequence[Path]) -> Path:
    """The file `ref` names, symlinks and .. resolved, if that lies under one of `input_dirs`.

    Payloads are user-controlled: without this, "/proc/self/environ" would hand the worker's secrets
    to whoever reads the job's output. The resolved path is what gets opened, and the file as opened is
    checked again (`copy_local`'s `check`), so a symlink swapped in between leads nowhere.
    """
    try:
        path = local_path_from_url(ref).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop; ValueError: a NUL (%00)
        raise JobError(ErrorCode.INPUT_INVALID, f"cannot resolve input {ref}: {e}") from None
    _check_local_path(ref, path, input_dirs)
    return path


def _check_local_path(ref: str, path: Path, input_dirs: Sequence[Path]) -> None:
    """Refuse `path`, symlinks and .. resolved already, unless it lies under one of `input_dirs`."""
    if not any(path.is_relative_to(d.resolve()) for d in input_dirs):
        allowed = ", ".join(str(d) for d in input_dirs) or "none"
        raise JobError(
            ErrorCode.INPUT_INVALID,
            f"refusing input {ref}: local inputs must lie under GPUQ_INPUT_DIRS (now: {allowed}), "
            "symlinks and .. followed",
        )


def _redact(text: str, url: str) -> str:
    """`text` without the URL's query and user info: a presigned URL's signature is a credential."""
    parts = urlsplit(url)
    if parts.query:
        text = text.replace(parts.query, "…")
    if "@" in parts.netloc:
        text = text.replace(parts.netloc.rsplit("@", 1)[0], "…")
    return text


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (NAT64, 6to4, Teredo, IPv4-compatible): a translator or
    relay may deliver to them, so 64:ff9b::a9fe:a9fe can be 169.254.169.254."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if any(ip in n for n in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # not :: nor ::1
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)  # the server and the client
    return []


def _refusal(ip: IPAddress, allow_private: bool) -> str | None:
    """Why an input URL may not reach `ip`, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254, to the kernel too
    # The embedded addresses first, as what they are, then the IPv6 address itself.
    checked = [(a, f"which embeds {a}, ") for a in _embedded_ipv4(ip)] + [(ip, "")]
    for addr, embeds in checked:
        if any(addr in n for n in _LINK_LOCAL):
            return f"{embeds}a link-local address where cloud metadata lives"
        if any(addr in n for n in _METADATA):
            return f"{embeds}a cloud metadata address"
    if allow_private:
        return None
    # On a rented machine ComfyUI and the worker's metrics listen locally: their answers must not
    # become outputs. Private networks are opt-in.
    for addr, embeds in checked:
        kind = next((k for k, nets in _REFUSED if any(addr in n for n in nets)), None)
        if kind is None and not addr.is_global:
            kind = "private"
        if kind:
            article = "an" if kind == "unspecified" else "a"
            return (
                f"{embeds}{article} {kind} address; "
                "set GPUQ_INPUT_ALLOW_PRIVATE=1 to fetch inputs from private networks"
            )
    return None


def _ip(address: str) -> IPAddress:
    return ipaddress.ip_address(address.split("%")[0])  # without an IPv6 scope ("fe80::1%eth0")


def _refuse_forbidden_addresses(url: str, shown: str, allow_private: bool) -> None:
    """Before connecting: every address the host resolves to, for an error that names the host."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return  # requests reports the unresolvable host in its own words
    for info in infos:
        ip = _ip(str(info[4][0]))
        if why := _refusal(ip, allow_private):
            raise JobError(ErrorCode.INPUT_INVALID, f"refusing input {shown}: {host} is {ip}, {why}")


class _ForbiddenPeer(Exception):
    def __init__(self, host: str, ip: IPAddress, why: str) -> None:
        super().__init__(f"{host} connected to {ip}, {why}")


def _checked(sock: socket.socket, host: str, allow_private: bool) -> socket.socket:
    ip = _ip(sock.getpeername()[0])
    if why := _refusal(ip, allow_private):
        sock.close()
        raise _ForbiddenPeer(host, ip, why)  # not an OSError: urllib3 and requests let it through
    return sock


@cache
def _checked_pools(allow_private: bool) -> dict[str, type[HTTPConnectionPool]]:
    """urllib3 pools whose connections check the address actually connected to.

    The host is resolved again at connect time, so a check beforehand alone falls to DNS rebinding
    (a name that answers a public address first and 127.0.0.1 or 169.254.169.254 next).
    """

    class Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _checked(super()._new_conn(), self.host, allow_private)

    class TLSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _checked(super()._new_conn(), self.host, allow_private)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConnection

    return {"http": Pool, "https": TLSPool}


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, allow_private: bool) -> None:
        self._pools = _checked_pools(allow_private)  # before super().__init__, which builds the manager
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools


def _session(allow_private: bool) -> requests.Session:
    session = requests.Session()
    # No proxies from the environment: through one, the address checked would be the proxy's.
    # (Nor ~/.netrc credentials, which would go to whatever host a payload names.)
    session.trust_env = False
    # That also drops the CA bundle requests takes from the environment: for https inputs signed by a
    # private CA, honour it here as requests would.
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    adapter = _CheckedAdapter(allow_private)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _get(
    session: requests.Session, url: str, shown: str, timeout_s: float, allow_private: bool
) -> requests.Response:
    """GET with redirects followed by hand, so that every hop is checked before it is connected to."""
    for _ in range(MAX_REDIRECTS + 1):
        _refuse_forbidden_addresses(url, shown, allow_private)
        try:
            r = session.get(url, stream=True, timeout=(timeout_s, timeout_s), allow_redirects=False)
        except requests.RequestException:  # InvalidURL is a ValueError too
            raise
        except ValueError as e:
            # requests parses a redirect's Location even when not following it (Response.next); the URL
            # asked for passed urlsplit already, and requests reports its other faults as InvalidURL.
            raise JobError(ErrorCode.INPUT_INVALID, f"GET {shown}: malformed redirect: {e}") from None
        if not r.is_redirect:
            return r
        r.close()
        try:
            url = urljoin(url, r.headers["Location"])
            scheme = _split_checked(url).scheme.lower()
        except ValueError as e:
            raise JobError(ErrorCode.INPUT_INVALID, f"GET {shown}: malformed redirect: {e}") from None
        if scheme not in ("http", "https"):
            # requests would answer "No connection adapters", a retryable failure that retrying never fixes
            raise JobError(ErrorCode.INPUT_INVALID, f"GET {shown}: refusing a redirect to a {scheme}: URL")
    raise JobError(ErrorCode.INPUT_INVALID, f"GET {shown}: more than {MAX_REDIRECTS} redirects")


def _fetch_http(url: str, dest: Path, *, max_bytes: int, timeout_s: float, allow_private: bool) -> Path:
    shown = _redact(url, url)
    # requests' timeout bounds each connect and each read; the deadline bounds the whole transfer,
    # so a server that trickles bytes cannot hold the job forever.
    deadline = time.monotonic() + timeout_s
    try:
        with _session(allow_private) as session, _get(session, url, shown, timeout_s, allow_private) as r:
            if r.status_code >= 500 or r.status_code in _RETRYABLE_HTTP:
                raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"GET {shown}: HTTP {r.status_code}")
            if r.status_code >= 400:
                raise JobError(ErrorCode.INPUT_INVALID, f"GET {shown}: HTTP {r.status_code}")
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise JobError(ErrorCode.INPUT_INVALID, f"{shown} is {length} bytes, over {max_bytes}")
            written = 0
            with dest.open("wb") as f:
                # read1 returns what has arrived, so a trickle cannot stall us between deadline checks;
                # decoded bytes count toward the limit, so a small gzip bomb cannot slip past it.
                while chunk := r.raw.read1(CHUNK, decode_content=True):
                    written += len(chunk)
                    if written > max_bytes:
                        raise JobError(ErrorCode.INPUT_INVALID, f"{shown} is over {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"GET {shown}: over {timeout_s:g}s")
                    f.write(chunk)
    except JobError:
        dest.unlink(missing_ok=True)
        raise
    except _ForbiddenPeer as e:
        dest.unlink(missing_ok=True)
        raise JobError(ErrorCode.INPUT_INVALID, f"refusing input {shown}: {e}") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        dest.unlink(missing_ok=True)
        code = ErrorCode.INPUT_INVALID if isinstance(e, requests.exceptions.InvalidURL) else None
        # `from None`: the requests exception's text holds the full URL, signature included.
        raise JobError(code or ErrorCode.INPUT_FETCH_FAILED, f"GET {shown}: {_redact(str(e), url)}") from None
    return dest
