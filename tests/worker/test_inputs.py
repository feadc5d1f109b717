"""fetch_input against real servers on 127.0.0.1 (http, moto's S3, the Supabase stand-in) and output_key."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
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

import worker.inputs
from tests.standins.supabase_storage import SupabaseStorageStandIn
from worker.errors import ErrorCode, JobError
from worker.inputs import _refusal, fetch_input, output_key
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
def private_ca_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An https server on 127.0.0.1 whose certificate a private CA signed: its URL and the CA's PEM file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("private-ca")
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpuq test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Handler(_Handler):
        pass

    Handler.stop = threading.Event()
    Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_pem, key_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca_pem
    Handler.stop.set()
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
    ("ref", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/", "a link-local address where cloud metadata lives"),
        ("http://[fd00:ec2::254]/latest/", "a cloud metadata address"),
        ("http://100.100.100.200/latest/meta-data/", "a cloud metadata address"),  # Alibaba
        ("http://169.254.1.1/x", "a link-local address where cloud metadata lives"),
        # the same address, IPv4-mapped
        ("http://[::ffff:169.254.169.254]/latest/", "a link-local address where cloud metadata lives"),
    ],
)
def test_http_refuses_cloud_metadata_addresses_before_connecting(ref: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(JobError, match=why) as err:
        fetch(ref, tmp_path)  # private addresses allowed
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
    ("ref", "why"),
    [
        ("http://10.1.2.3/x.png", "a private"),
        ("http://192.168.0.10/x.png", "a private"),
        ("http://172.16.5.4/x.png", "a private"),
        ("http://100.64.0.1/x.png", "a private"),  # shared address space (carrier-grade NAT)
        ("http://[fd12:3456::1]/x.png", "a private"),  # IPv6 unique local
        ("http://[::1]:8188/view", "a loopback"),
        ("http://[::ffff:127.0.0.1]:8188/view", "a loopback"),
        ("http://0.0.0.0:8188/view", "an unspecified"),
        ("http://224.0.0.1/x.png", "a multicast"),
        ("http://[64:ff9b::7f00:1]:8188/view", "which embeds 127.0.0.1, a loopback"),  # NAT64
    ],
)
def test_http_refuses_private_addresses_by_default(ref: str, why: str, tmp_path: Path) -> None:
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path, allow_private=False)
    assert f"{why} address; set GPUQ_INPUT_ALLOW_PRIVATE=1" in str(err)


LINK_LOCAL = "a link-local address where cloud metadata lives"
METADATA = "a cloud metadata address"


def _teredo(server: str, client: str) -> str:
    """A Teredo address (2001::/32): the server's IPv4 address, then the client's with its bits inverted."""
    inverted = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address((0x2001 << 112) | (int(ipaddress.IPv4Address(server)) << 64) | inverted))


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("169.254.169.254", LINK_LOCAL),  # AWS, GCP, Azure, Oracle, ...
        ("169.254.0.23", LINK_LOCAL),  # Tencent
        ("fe80::1", LINK_LOCAL),
        ("fd00:ec2::254", METADATA),  # AWS over IPv6
        ("100.100.100.200", METADATA),  # Alibaba
        ("192.0.0.192", METADATA),  # Oracle's legacy endpoint; Python 3.11.7 calls it global
        ("::ffff:169.254.169.254", LINK_LOCAL),
        ("::ffff:100.100.100.200", METADATA),
        ("64:ff9b::a9fe:a9fe", f"which embeds 169.254.169.254, {LINK_LOCAL}"),  # NAT64
        ("64:ff9b:1::a9fe:a9fe", f"which embeds 169.254.169.254, {LINK_LOCAL}"),  # local-use NAT64
        ("64:ff9b::6464:64c8", f"which embeds 100.100.100.200, {METADATA}"),
        ("2002:a9fe:a9fe::1", f"which embeds 169.254.169.254, {LINK_LOCAL}"),  # 6to4
        ("2002:c000:c0::", f"which embeds 192.0.0.192, {METADATA}"),
        (_teredo("8.8.8.8", "169.254.169.254"), f"which embeds 169.254.169.254, {LINK_LOCAL}"),
        (_teredo("169.254.169.254", "8.8.8.8"), f"which embeds 169.254.169.254, {LINK_LOCAL}"),
        ("::a9fe:a9fe", f"which embeds 169.254.169.254, {LINK_LOCAL}"),  # IPv4-compatible
    ],
)
def test_cloud_metadata_is_refused_even_with_private_networks_allowed(address: str, why: str) -> None:
    ip = ipaddress.ip_address(address)
    assert _refusal(ip, allow_private=True) == why
    assert _refusal(ip, allow_private=False) == why


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "a loopback"),
        ("127.255.0.1", "a loopback"),
        ("::1", "a loopback"),
        ("0.0.0.0", "an unspecified"),
        ("0.1.2.3", "an unspecified"),  # "this network"
        ("::", "an unspecified"),
        ("224.0.0.1", "a multicast"),
        ("239.255.255.250", "a multicast"),
        ("ff02::1", "a multicast"),
        ("10.1.2.3", "a private"),
        ("172.31.255.1", "a private"),
        ("192.168.1.1", "a private"),
        ("100.64.0.1", "a private"),  # carrier-grade NAT
        ("100.127.255.254", "a private"),
        ("fc00::1", "a private"),
        ("fd12:3456::1", "a private"),
        ("fec0::1", "a private"),  # site-local, deprecated; Python 3.11.7 calls it global
        ("192.0.0.8", "a reserved"),
        ("192.0.2.1", "a reserved"),
        ("198.51.100.7", "a reserved"),
        ("203.0.113.7", "a reserved"),
        ("198.18.0.1", "a reserved"),
        ("198.19.255.1", "a reserved"),
        ("192.88.99.1", "a reserved"),
        ("240.0.0.1", "a reserved"),
        ("255.255.255.255", "a reserved"),
        ("2001:db8::1", "a reserved"),
        ("100::1", "a reserved"),
        ("3fff::1", "a reserved"),
        ("5f00::1", "a reserved"),
        ("64:ff9b:1::808:808", "a reserved"),  # local-use NAT64, to a public address
        (_teredo("8.8.8.8", "8.8.4.4"), "a reserved"),
        ("::ffff:127.0.0.1", "a loopback"),
        ("::ffff:10.0.0.1", "a private"),
        ("64:ff9b::7f00:1", "which embeds 127.0.0.1, a loopback"),  # NAT64
        ("64:ff9b::a00:1", "which embeds 10.0.0.1, a private"),
        ("64:ff9b::6440:1", "which embeds 100.64.0.1, a private"),
        ("64:ff9b:1::7f00:1", "which embeds 127.0.0.1, a loopback"),
        ("64:ff9b::e000:1", "which embeds 224.0.0.1, a multicast"),
        ("2002:7f00:1::", "which embeds 127.0.0.1, a loopback"),  # 6to4
        ("2002:c0a8:101::1", "which embeds 192.168.1.1, a private"),
        (_teredo("8.8.8.8", "127.0.0.1"), "which embeds 127.0.0.1, a loopback"),
        (_teredo("10.0.0.1", "8.8.8.8"), "which embeds 10.0.0.1, a private"),
        ("::7f00:1", "which embeds 127.0.0.1, a loopback"),  # IPv4-compatible
        ("::c0a8:101", "which embeds 192.168.1.1, a private"),
    ],
)
def test_private_addresses_are_refused_unless_allowed(address: str, why: str) -> None:
    ip = ipaddress.ip_address(address)
    suffix = " address; set GPUQ_INPUT_ALLOW_PRIVATE=1 to fetch inputs from private networks"
    assert _refusal(ip, allow_private=False) == why + suffix
    assert _refusal(ip, allow_private=True) is None


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2001:4860:4860::8888",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 to a public address
        "2002:808:808::1",  # 6to4 from one
        "::808:808",
    ],
)
def test_public_addresses_are_not_refused(address: str) -> None:
    assert _refusal(ipaddress.ip_address(address), allow_private=False) is None


def test_http_refuses_a_name_resolving_to_a_nat64_embedded_address(
    http_server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS64 answer for a name whose IPv4 address is 127.0.0.1, then 169.254.169.254: refused before
    connecting (where NAT64 runs, connecting would reach them)."""
    url, seen = http_server
    real_getaddrinfo = socket.getaddrinfo
    answers = {"dns64.example": "64:ff9b::7f00:1", "metadata.dns64.example": "64:ff9b::a9fe:a9fe"}

    def dns64(host: object, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo(answers.get(str(host), host), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", dns64)
    ref = "http://dns64.example/files/dns64.bin"
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path, allow_private=False, timeout_s=1.0)
    assert err.message == (
        f"refusing input {ref}: dns64.example is 64:ff9b::7f00:1, which embeds 127.0.0.1, a loopback "
        "address; set GPUQ_INPUT_ALLOW_PRIVATE=1 to fetch inputs from private networks"
    )
    # through a redirect from a server private networks may reach
    ref = f"{url}/redirect-to/{quote('http://metadata.dns64.example/latest/meta-data/', safe='')}"
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path, allow_private=True, timeout_s=1.0)
    assert err.message == (
        f"refusing input {ref}: metadata.dns64.example is 64:ff9b::a9fe:a9fe, which embeds 169.254.169.254, "
        "a link-local address where cloud metadata lives"
    )
    assert "/files/dns64.bin" not in seen and "/latest/meta-data/" not in seen
    assert list(tmp_path.iterdir()) == []


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
        (
            f"http://{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 63}.com/x.png",
            "malformed redirect: host name of 259 characters, over 253",
        ),
    ],
)
def test_http_refuses_a_redirect_off_http(http_url: str, location: str, why: str, tmp_path: Path) -> None:
    """Not INPUT_FETCH_FAILED ("No connection adapters"), which would be retried to the same end."""
    ref = f"{http_url}/redirect-to/{quote(location, safe='')}"
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path)
    assert err.message == f"GET {ref}: {why}"
    assert not err.retryable
    assert list(tmp_path.iterdir()) == []


def test_https_with_a_private_ca_from_requests_ca_bundle(
    private_ca_https: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment is not trusted (proxies), but its CA bundle is honoured as requests would."""
    url, ca_pem = private_ca_https
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    err = fails(ErrorCode.INPUT_FETCH_FAILED, f"{url}/files/signed.bin", tmp_path)
    assert "CERTIFICATE_VERIFY_FAILED" in err.message
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        with monkeypatch.context() as env:
            env.setenv(name, str(ca_pem))
            assert fetch(f"{url}/files/{name}.bin", tmp_path).read_bytes() == BODY


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


@pytest.mark.parametrize("swap", ["file", "directory"])
def test_local_inputs_checked_on_the_file_opened(
    swap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink swapped in between the check of the path and the copy does not lead out."""
    allowed = tmp_path / "inputs"
    (allowed / "refs").mkdir(parents=True)
    (allowed / "refs" / "a.png").write_bytes(BODY)
    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "a.png").write_text("DATABASE_URL=postgresql://worker:s3cret@db/app\n")
    check_path = worker.inputs._allowed_local_path

    def check_then_swap(ref: str, input_dirs: Any) -> Path:
        path = check_path(ref, input_dirs)
        if swap == "file":
            (allowed / "refs" / "a.png").unlink()
            (allowed / "refs" / "a.png").symlink_to(outside / "a.png")
        else:
            (allowed / "refs").rename(allowed / "old-refs")
            (allowed / "refs").symlink_to(outside)
        return path

    monkeypatch.setattr(worker.inputs, "_allowed_local_path", check_then_swap)
    ref = str(allowed / "refs" / "a.png")
    err = fails(ErrorCode.INPUT_INVALID, ref, tmp_path / "job", input_dirs=[allowed])
    assert err.message.startswith(f"refusing input {ref}: local inputs must lie under GPUQ_INPUT_DIRS")
    assert list((tmp_path / "job").iterdir()) == []


def test_local_inputs_stop_at_the_limit_when_the_file_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size checked is the open file's, and the copy stops past max_bytes should it grow after."""
    allowed = tmp_path / "inputs"
    allowed.mkdir()
    src = allowed / "growing.wav"
    src.write_bytes(BODY)
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if st.st_ino == src.stat().st_ino and st.st_size == len(BODY):
            with src.open("ab") as f:
                f.write(b"x" * LIMIT)  # a writer appends between the size check and the copy
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(JobError) as err:
        fetch(str(src), tmp_path / "job", input_dirs=[allowed], max_bytes=2 * len(BODY))
    monkeypatch.undo()
    assert err.value.code == ErrorCode.INPUT_INVALID
    assert err.value.message == f"{src} grew past the limit of {2 * len(BODY)} bytes"
    assert list((tmp_path / "job").iterdir()) == []


def test_local_inputs_refuse_a_fifo_without_blocking(tmp_path: Path) -> None:
    allowed = tmp_path / "inputs"
    allowed.mkdir()
    os.mkfifo(allowed / "pipe.wav")  # opening it for reading would wait for a writer
    err = fails(ErrorCode.INPUT_INVALID, str(allowed / "pipe.wav"), tmp_path / "job", input_dirs=[allowed])
    assert err.message == f"no such file: {allowed / 'pipe.wav'}"


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("{dir}/a\x00.png", "control characters"),
        ("file://{dir}/a%00.png", "embedded null byte"),  # Path.resolve raises ValueError
        ("http://[::1/a.png", "Invalid IPv6 URL"),  # and so does urlsplit
        ("http://[zz]/a.png", "does not appear to be an IPv4 or IPv6 address"),
        ("s3://[::1/a.png", "Invalid IPv6 URL"),
        ("http://127.0.0.1/a\nb.png", "control characters"),  # urlsplit would drop the newline
        # host names no resolver can look up: a bad label used to be reported as a "malformed redirect"
        # (urllib3's parse error), a name over 253 as INPUT_FETCH_FAILED, retried to the same end
        (f"https://{'a' * 64}.example.com/a.png", "has an empty label or one over 63 characters"),
        (f"http://{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 63}.com/a.png", "host name of 259 characters"),
        ("http://a..example.com/a.png", "has an empty label"),
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
