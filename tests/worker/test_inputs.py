"""fetch_input against real servers on 127.0.0.1 (http, moto's S3, the Supabase stand-in) and output_key."""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import boto3
import pytest

from tests.standins.supabase_storage import SupabaseStorageStandIn
from worker.errors import ErrorCode, JobError
from worker.inputs import fetch_input, output_key
from worker.storage.base import Storage
from worker.storage.s3 import S3Storage
from worker.storage.supabase import SupabaseStorage

BODY = bytes(range(256)) * 64  # 16 KiB
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
LIMIT = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stop: threading.Event
    seen: list[str]  # the paths asked for, to show a refused input never reached the server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _head(self, status: int, length: int | None = None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.seen.append(path)
        if path.endswith(".bin"):
            self._head(200, len(BODY))
            self.wfile.write(BODY)
        elif path == "/redirect":
            self._head(302, 0, {"Location": "/moved/avatar.bin"})
        elif path == "/redirect-to-metadata":
            self._head(302, 0, {"Location": "http://169.254.169.254/latest/meta-data/iam/"})
        elif path.startswith("/redirect-to/"):  # /redirect-to/<Location, percent-encoded>
            self._head(302, 0, {"Location": unquote(path.removeprefix("/redirect-to/"))})
        elif path == "/redirect-loop":
            self._head(302, 0, {"Location": "/redirect-loop"})
        elif path == "/big-declared":  # says it is large up front
            self._head(200, 10 * LIMIT)
            self.wfile.write(b"x" * 1024)
        elif path == "/big-undeclared":  # no Content-Length: only counting catches it
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(LIMIT // 65536 + 4):
                self.wfile.write(b"y" * 65536)
        elif path in ("/missing", "/forbidden", "/error", "/unavailable", "/busy"):
            status = {"/missing": 404, "/forbidden": 403, "/error": 500, "/unavailable": 503, "/busy": 429}
            self._head(status[path], 5)
            self.wfile.write(b"nope\n")
        elif path == "/stall":  # headers, then silence
            self._head(200, len(BODY))
            self.wfile.flush()
            self.stop.wait(10)
        elif path == "/trickle":  # a byte at a time, each within the read timeout
            self._head(200, 1000)
            for _ in range(1000):
                if self.stop.wait(0.05):
                    return
                self.wfile.write(b"z")
                self.wfile.flush()
        else:
            self._head(404, 0)


@pytest.fixture(scope="module")
def http_server() -> Iterator[tuple[str, list[str]]]:
    """The server's URL and the paths it was asked for."""
    stop = threading.Event()

    class Handler(_Handler):
        pass

    Handler.stop = stop
    Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Handler.seen
    stop.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def http_url(http_server: tuple[str, list[str]]) -> str:
    return http_server[0]


@pytest.fixture(autouse=True)
def no_storage_env(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """aws_env (tests/worker/conftest.py), and no Supabase configuration either."""
    monkeypatch.delenv("SUPABASE_URL", raising=False)
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY", raising=False)


@pytest.fixture(scope="module")
def supa() -> Iterator[SupabaseStorageStandIn]:
    with SupabaseStorageStandIn() as standin:
        standin.create_bucket("inputs")
        standin.create_bucket("private")  # another tenant's
        yield standin


def fetch(ref: str, dest: Path, **kwargs: object) -> Path:
    # The servers here listen on 127.0.0.1, which inputs reach only when opted in.
    options: dict = {"max_bytes": LIMIT, "timeout_s": 5.0, "allow_private": True, **kwargs}
    return fetch_input(ref, dest, **options)


def fails(code: ErrorCode, ref: str, dest: Path, **kwargs: object) -> JobError:
    with pytest.raises(JobError) as info:
        fetch(ref, dest, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# -- http(s)


def test_http_fetch(http_url: str, tmp_path: Path) -> None:
    got = fetch(f"{http_url}/files/avatar.bin?v=2", tmp_path / "in")
    assert got == tmp_path / "in" / "avatar.bin"
    assert got.read_bytes() == BODY
    # Two inputs with the same name both survive.
    second = fetch(f"{http_url}/other/avatar.bin", tmp_path / "in")
    assert second == tmp_path / "in" / "avatar-1.bin"
    assert second.read_bytes() == BODY


def test_http_follows_redirects(http_url: str, tmp_path: Path) -> None:
    assert fetch(f"{http_url}/redirect", tmp_path).read_bytes() == BODY


@pytest.mark.parametrize(
    "ref",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fd00:ec2::254]/latest/",
        "http://169.254.1.1/x",
        "http://[::ffff:169.254.169.254]/latest/",  # the same address, IPv4-mapped
    ],
)
def test_http_refuses_cloud_metadata_addresses_before_connecting(ref: str, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="link-local address where cloud metadata lives") as err:
        fetch(ref, tmp_path)
    assert err.value.code == ErrorCode.INPUT_INVALID and not err.value.retryable
    assert list(tmp_path.iterdir()) == []


def test_http_refuses_a_redirect_to_cloud_metadata(http_url: str, tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"169\.254\.169\.254 is 169\.254\.169\.254, a link-local address"):
        fetch(f"{http_url}/redirect-to-metadata", tmp_path)


def test_http_refuses_loopback_by_default(http_server: tuple[str, list[str]], tmp_path: Path) -> None:
    url, seen = http_server
    for ref in (f"{url}/files/loopback.bin", url.replace("127.0.0.1", "localhost") + "/files/localhost.bin"):
        err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path, allow_private=False)
        assert "a loopback address; set GPUQ_INPUT_ALLOW_PRIVATE=1" in str(err) and not err.retryable
    assert "/files/loopback.bin" not in seen and "/files/localhost.bin" not in seen
    assert list(tmp_path.iterdir()) == []
    # opted in, the same URL is fetched
    assert fetch(f"{url}/files/loopback.bin", tmp_path, allow_private=True).read_bytes() == BODY


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("http://10.1.2.3/x.png", "private"),
        ("http://192.168.0.10/x.png", "private"),
        ("http://172.16.5.4/x.png", "private"),
        ("http://100.100.100.200/latest/meta-data/", "private"),  # shared address space (Alibaba metadata)
        ("http://[fd12:3456::1]/x.png", "private"),  # IPv6 unique local
        ("http://[::1]:8188/view", "loopback"),
        ("http://[::ffff:127.0.0.1]:8188/view", "loopback"),
        ("http://0.0.0.0:8188/view", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
    ],
)
def test_http_refuses_private_addresses_by_default(ref: str, kind: str, tmp_path: Path) -> None:
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path, allow_private=False)
    assert f"a {kind} address; set GPUQ_INPUT_ALLOW_PRIVATE=1" in str(err)


def test_http_checks_the_address_connected_to_not_only_the_first_lookup(
    http_server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves to a public address when checked, to 127.0.0.1 when connected."""
    url, seen = http_server
    port = urlsplit(url).port
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding_dns(host: object, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]
        answer = "93.184.216.34" if not lookups else "127.0.0.1"
        lookups.append(answer)
        return real_getaddrinfo(answer, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    ref = f"http://rebind.example:{port}/files/rebound.bin"
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path, allow_private=False)
    assert err.message.startswith(f"refusing input {ref}:")
    assert "rebind.example connected to 127.0.0.1, a loopback address" in err.message
    assert lookups[0] == "93.184.216.34" and "127.0.0.1" in lookups[1:]  # it passed the first check
    assert "/files/rebound.bin" not in seen  # closed before a byte was sent
    assert list(tmp_path.iterdir()) == []

    # the same rebinding with private addresses allowed reaches the server: the refusal above was the check's
    lookups.clear()
    got = fetch(ref, tmp_path, allow_private=True)
    assert got.read_bytes() == BODY and "/files/rebound.bin" in seen


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("file:///etc/passwd", "refusing a redirect to a file: URL"),
        ("s3://other-bucket/private.png", "refusing a redirect to a s3: URL"),
        ("supabase://private/users/1/a.png", "refusing a redirect to a supabase: URL"),
        ("ftp://example.com/x.png", "refusing a redirect to a ftp: URL"),
        ("http://[::1/x.png", "malformed redirect: Invalid IPv6 URL"),
        ("/moved/a\x00.png", "malformed redirect: control characters in it"),
    ],
)
def test_http_refuses_a_redirect_off_http(http_url: str, location: str, why: str, tmp_path: Path) -> None:
    """Not INPUT_FETCH_FAILED ("No connection adapters"), which would be retried to the same end."""
    ref = f"{http_url}/redirect-to/{quote(location, safe='')}"
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path)
    assert err.message == f"GET {ref}: {why}"
    assert not err.retryable
    assert list(tmp_path.iterdir()) == []


def test_http_gives_up_on_a_redirect_loop(http_url: str, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="more than 5 redirects") as err:
        fetch(f"{http_url}/redirect-loop", tmp_path)
    assert err.value.code == ErrorCode.INPUT_INVALID


def test_http_size_limits(http_url: str, tmp_path: Path) -> None:
    err = fails(ErrorCode.INPUT_INVALID, f"{http_url}/big-declared", tmp_path)
    assert not err.retryable
    fails(ErrorCode.INPUT_INVALID, f"{http_url}/big-undeclared", tmp_path)
    fails(ErrorCode.INPUT_INVALID, f"{http_url}/files/avatar.bin", tmp_path, max_bytes=len(BODY) - 1)
    assert list(tmp_path.iterdir()) == []  # no partial files left behind


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/missing", ErrorCode.INPUT_INVALID),
        ("/forbidden", ErrorCode.INPUT_INVALID),
        ("/error", ErrorCode.INPUT_FETCH_FAILED),
        ("/unavailable", ErrorCode.INPUT_FETCH_FAILED),
        ("/busy", ErrorCode.INPUT_FETCH_FAILED),
    ],
)
def test_http_status_codes(http_url: str, tmp_path: Path, path: str, code: ErrorCode) -> None:
    err = fails(code, f"{http_url}{path}", tmp_path)
    assert err.retryable == (code == ErrorCode.INPUT_FETCH_FAILED)
    assert list(tmp_path.iterdir()) == []


def test_http_stalled_server_times_out(http_url: str, tmp_path: Path) -> None:
    start = time.monotonic()
    err = fails(ErrorCode.INPUT_FETCH_FAILED, f"{http_url}/stall", tmp_path, timeout_s=0.5)
    assert time.monotonic() - start < 3
    assert err.retryable
    assert list(tmp_path.iterdir()) == []


def test_http_trickling_server_hits_the_deadline(http_url: str, tmp_path: Path) -> None:
    start = time.monotonic()
    fails(ErrorCode.INPUT_FETCH_FAILED, f"{http_url}/trickle", tmp_path, timeout_s=0.6)
    assert time.monotonic() - start < 3


def test_http_unreachable_and_signature_not_in_message(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png?X-Amz-Signature=s3cr3tsig&X-Amz-Credential=AKIAEXAMPLE"
    err = fails(ErrorCode.INPUT_FETCH_FAILED, url, tmp_path)
    assert err.retryable
    assert "s3cr3tsig" not in str(err)
    assert "AKIAEXAMPLE" not in str(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_http_error_message_hides_query(http_url: str, tmp_path: Path) -> None:
    err = fails(ErrorCode.INPUT_FETCH_FAILED, f"{http_url}/error?token=s3cr3t", tmp_path)
    assert "s3cr3t" not in str(err)
    assert "/error" in str(err)


# -- local paths


def test_local_paths(tmp_path: Path) -> None:
    src = tmp_path / "src" / "voice ref.wav"
    src.parent.mkdir()
    src.write_bytes(BODY)
    dirs = [src.parent]
    got = fetch(str(src), tmp_path / "job", input_dirs=dirs)
    assert got == tmp_path / "job" / "voice_ref.wav"
    assert got.read_bytes() == BODY
    assert fetch(src.as_uri(), tmp_path / "job", input_dirs=dirs).read_bytes() == BODY

    fails(ErrorCode.INPUT_INVALID, str(src), tmp_path / "job2", input_dirs=dirs, max_bytes=len(BODY) - 1)
    fails(ErrorCode.INPUT_INVALID, str(tmp_path / "src" / "absent.wav"), tmp_path / "job2", input_dirs=dirs)
    fails(ErrorCode.INPUT_INVALID, str(tmp_path / "src"), tmp_path / "job2", input_dirs=dirs)  # a directory
    fails(ErrorCode.INPUT_INVALID, "src/voice.wav", tmp_path / "job2", input_dirs=dirs)  # relative: ambiguous
    fails(ErrorCode.INPUT_INVALID, "file://otherhost/etc/hosts", tmp_path / "job2", input_dirs=dirs)


def test_local_inputs_only_from_under_the_input_dirs(tmp_path: Path) -> None:
    allowed = tmp_path / "inputs"
    (allowed / "refs").mkdir(parents=True)
    (allowed / "refs" / "a.png").write_bytes(BODY)
    secret = tmp_path / "worker.env"
    secret.write_text("DATABASE_URL=postgresql://worker:s3cret@db/app\n")
    (tmp_path / "inputs-other").mkdir()  # shares the allowed directory's name as a prefix
    (tmp_path / "inputs-other" / "b.png").write_bytes(BODY)
    (allowed / "link-out.png").symlink_to(secret)
    (allowed / "dir-out").symlink_to(tmp_path)
    (allowed / "link-in.png").symlink_to(allowed / "refs" / "a.png")
    dest = tmp_path / "job"

    for ref in (
        str(secret),
        secret.as_uri(),
        f"{allowed}/../worker.env",
        str(allowed / "link-out.png"),  # a symlink inside pointing outside
        str(allowed / "dir-out" / "worker.env"),
        str(tmp_path / "inputs-other" / "b.png"),
        "/proc/self/environ",
        "file:///etc/passwd",
    ):
        err = fails(ErrorCode.INPUT_INVALID, ref, dest, input_dirs=[allowed])
        assert not err.retryable
        assert err.message == (
            f"refusing input {ref}: local inputs must lie under GPUQ_INPUT_DIRS (now: {allowed}), "
            "symlinks and .. followed"
        )
        assert not dest.exists() or list(dest.iterdir()) == []

    # inside, symlinks and .. are fine; so is an input dir named through a symlink
    assert fetch(str(allowed / "link-in.png"), dest, input_dirs=[allowed]).read_bytes() == BODY
    assert fetch(f"{allowed}/refs/../refs/a.png", dest, input_dirs=[allowed]).read_bytes() == BODY
    (tmp_path / "alias").symlink_to(allowed)
    assert fetch(str(allowed / "refs" / "a.png"), dest, input_dirs=[tmp_path / "alias"]).read_bytes() == BODY

    # with no input dirs (fetch_input's default), every local path is refused
    err = fails(ErrorCode.INPUT_INVALID, str(allowed / "refs" / "a.png"), dest)
    assert "GPUQ_INPUT_DIRS (now: none)" in err.message


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("{dir}/a\x00.png", "control characters"),
        ("file://{dir}/a%00.png", "embedded null byte"),  # Path.resolve raises ValueError
        ("http://[::1/a.png", "Invalid IPv6 URL"),  # and so does urlsplit
        ("http://[zz]/a.png", "does not appear to be an IPv4 or IPv6 address"),
        ("s3://[::1/a.png", "Invalid IPv6 URL"),
        ("http://127.0.0.1/a\nb.png", "control characters"),  # urlsplit would drop the newline
    ],
)
def test_malformed_refs_are_input_invalid(ref: str, why: str, tmp_path: Path) -> None:
    """Not a WORKER_ERROR, which would be retried; and no NUL in the message, which Postgres cannot store."""
    allowed = tmp_path / "inputs"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(BODY)
    err = fails(ErrorCode.INPUT_INVALID, ref.format(dir=allowed), tmp_path / "job", input_dirs=[allowed])
    assert why in err.message and not err.retryable
    assert not _CONTROL_CHARS.search(err.message)


@pytest.mark.parametrize("ref", ["ftp://host/x.png", "data:image/png;base64,AAAA", "gs://b/x.png"])
def test_unknown_schemes(tmp_path: Path, ref: str) -> None:
    assert not fails(ErrorCode.INPUT_INVALID, ref, tmp_path).retryable


# -- s3:// and supabase:// through the storage kinds


def test_s3_inputs(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = f"in-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="refs/garment.png", Body=BODY)

    # a second bucket, beside the output bucket, allowed for s3:// inputs
    storages = {"s3": S3Storage("outputs-bucket", endpoint_url=moto_url)}
    allowed = {"input_buckets": ("s3://outputs-bucket", f"s3://{bucket}")}
    got = fetch(f"s3://{bucket}/refs/garment.png", tmp_path, storages=storages, **allowed)
    assert (got.name, got.read_bytes()) == ("garment.png", BODY)
    fails(ErrorCode.INPUT_INVALID, f"s3://{bucket}/refs/none.png", tmp_path, storages=storages, **allowed)
    fails(
        ErrorCode.INPUT_INVALID,
        f"s3://{bucket}/refs/garment.png",
        tmp_path,
        storages=storages,
        max_bytes=100,
        **allowed,
    )

    # With no storage given, one is built from the environment.
    monkeypatch.setenv("GPUQ_S3_ENDPOINT_URL", moto_url)
    assert fetch(f"s3://{bucket}/refs/garment.png", tmp_path / "env", **allowed).read_bytes() == BODY


def test_supabase_inputs(
    supa: SupabaseStorageStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = SupabaseStorage(supa.url, supa.service_role_key, "inputs")
    src = tmp_path / "avatar.png"
    src.write_bytes(BODY)
    storage.put("users/1/avatar.png", src, "image/png")
    allowed = {"input_buckets": ("supabase://inputs",)}  # the output bucket

    got = fetch(
        "supabase://inputs/users/1/avatar.png", tmp_path / "job", storages={"supabase": storage}, **allowed
    )
    assert (got.name, got.read_bytes()) == ("avatar.png", BODY)
    fails(
        ErrorCode.INPUT_INVALID,
        "supabase://inputs/users/1/none.png",
        tmp_path,
        storages={"supabase": storage},
        **allowed,
    )
    supa.fail_next(503)
    err = fails(
        ErrorCode.INPUT_FETCH_FAILED,
        "supabase://inputs/users/1/avatar.png",
        tmp_path,
        storages={"supabase": storage},
        **allowed,
    )
    assert err.retryable

    # Unconfigured: the payload asks for something this worker cannot read.
    err = fails(ErrorCode.INPUT_INVALID, "supabase://inputs/users/1/avatar.png", tmp_path / "x", **allowed)
    assert err.message.startswith("cannot read supabase:// inputs")
    monkeypatch.setenv("SUPABASE_URL", supa.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", supa.service_role_key)
    assert fetch("supabase://inputs/users/1/avatar.png", tmp_path / "env", **allowed).read_bytes() == BODY


# -- s3:// and supabase:// only from the allowed buckets

PHOTO = "users/2/photo.png"


@pytest.fixture(params=["s3", "supabase"])
def two_buckets(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, Storage], str, str]:
    """A storage of one scheme, its output bucket and another bucket, each holding PHOTO, as
    ({scheme: storage}, "scheme://outputs", "scheme://other"): the worker's credentials read both."""
    if request.param == "s3":
        moto_url = request.getfixturevalue("moto_url")
        outputs, other = f"out-{uuid.uuid4().hex[:12]}", f"private-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
        for bucket in (outputs, other):
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=PHOTO, Body=BODY)
        storage: Storage = S3Storage(outputs, "jobs", endpoint_url=moto_url)
    else:
        supa = request.getfixturevalue("supa")
        outputs, other = "inputs", "private"
        src = tmp_path / "photo.png"
        src.write_bytes(BODY)
        for bucket in (outputs, other):
            SupabaseStorage(supa.url, supa.service_role_key, bucket).put(PHOTO, src, "image/png")
        storage = SupabaseStorage(supa.url, supa.service_role_key, outputs, "jobs")
    scheme = request.param
    return {scheme: storage}, f"{scheme}://{outputs}", f"{scheme}://{other}"


def test_bucket_inputs_only_from_the_allowed_buckets(
    two_buckets: tuple[dict[str, Storage], str, str], tmp_path: Path
) -> None:
    storages, outputs, other = two_buckets
    scheme, _, name = other.partition("://")
    twin = "supabase" if scheme == "s3" else "s3"
    dest = tmp_path / "job"
    for allowed, shown in (
        ((outputs,), outputs),  # the worker's default: the output bucket only
        ((f"{twin}://{name}",), f"{twin}://{name}"),  # the same name for the other scheme
        ((), "none"),  # fetch_input's default
    ):
        err = fails(
            ErrorCode.INPUT_INVALID, f"{other}/{PHOTO}", dest, storages=storages, input_buckets=allowed
        )
        assert not err.retryable
        assert err.message == (
            f"refusing input {other}/{PHOTO}: bucket {other} is not in GPUQ_INPUT_BUCKETS (now: {shown})"
        )
        assert not dest.exists() or list(dest.iterdir()) == []

    # nor through dot segments, which a path-style endpoint or a proxy might resolve
    for ref in (f"{outputs}/../{name}/{PHOTO}", f"{outputs}/%2e%2E/{name}/{PHOTO}", f"{outputs}/./{PHOTO}"):
        err = fails(ErrorCode.INPUT_INVALID, ref, dest, storages=storages, input_buckets=(outputs,))
        assert err.message == f"refusing input {ref}: '.' or '..' in the object key"

    assert fetch(f"{outputs}/{PHOTO}", dest, storages=storages, input_buckets=(outputs,)).read_bytes() == BODY
    both = (outputs, other)  # a second bucket, allowed explicitly
    assert fetch(f"{other}/{PHOTO}", dest, storages=storages, input_buckets=both).read_bytes() == BODY


# -- output keys


def test_output_key() -> None:
    now = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
    assert output_key("tts", 123, "out.wav", now) == "tts/2026-11-22/123/out.wav"
    # The date is UTC's: 01:00 in Madrid on the 23rd is still the 22nd.
    madrid = datetime(2026, 11, 23, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert output_key("tryon", 5, "a.png", madrid) == "tryon/2026-11-22/5/a.png"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("dir\\evil.png", "evil.png"),
        ("my image (1).png", "my_image_1_.png"),
        (".hidden", "hidden"),
        ("", "output"),
        ("..", "output"),
        ("ñandú.wav", "_and_.wav"),
    ],
)
def test_output_key_sanitises_names(name: str, expected: str) -> None:
    key = output_key("q", 1, name, datetime(2026, 1, 2, tzinfo=UTC))
    assert key == f"q/2026-01-02/1/{expected}"


def test_output_key_sanitises_queue() -> None:
    assert output_key("../x y", 9, "o.png", datetime(2026, 1, 2, tzinfo=UTC)) == "x_y/2026-01-02/9/o.png"
