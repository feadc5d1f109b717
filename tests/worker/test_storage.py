"""Storage kinds against real clients: boto3 against moto's HTTP server, supabase-py against the stand-in."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
import requests

from tests.standins.supabase_storage import SupabaseStorageStandIn
from worker.errors import ErrorCode, JobError
from worker.storage import storage_from_url
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage
from worker.storage.supabase import SupabaseStorage

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
KEY = "tryon/2026-11-22/123/out.png"


pytestmark = pytest.mark.usefixtures("aws_env")  # tests/worker/conftest.py


@pytest.fixture
def bucket(moto_url: str) -> str:
    name = f"gpuq-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(moto_url: str) -> object:
    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")


@pytest.fixture(scope="module")
def supa() -> Iterator[SupabaseStorageStandIn]:
    with SupabaseStorageStandIn() as standin:
        standin.create_bucket("private")
        standin.create_bucket("media", public=True)
        yield standin


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "out.png"
    path.write_bytes(PNG)
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raises_code(code: ErrorCode, fn: Callable[..., object], *args: object) -> JobError:
    with pytest.raises(JobError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return info.value


# -- local


def test_local_put_copies_under_root_and_returns_file_url(tmp_path: Path, png: Path) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    url = storage.put(KEY, png, "image/png")
    assert url == (tmp_path / "outputs" / KEY).resolve().as_uri()
    assert (tmp_path / "outputs" / KEY).read_bytes() == PNG
    assert not list((tmp_path / "outputs").rglob("*.part"))


@pytest.mark.parametrize("key", ["../escape.png", "a/../../b.png", "", "/"])
def test_local_put_refuses_keys_outside_root(tmp_path: Path, png: Path, key: str) -> None:
    err = raises_code(ErrorCode.UPLOAD_FAILED, LocalStorage(tmp_path / "o").put, key, png, "image/png")
    assert err.retryable
    assert not (tmp_path / "escape.png").exists()


def test_local_get_round_trip_and_limits(tmp_path: Path, png: Path) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    url = storage.put(KEY, png, "image/png")
    got = storage.get(url, tmp_path / "in" / "x.png", max_bytes=len(PNG))
    assert got.read_bytes() == PNG
    raises_code(ErrorCode.INPUT_INVALID, storage.get, url, tmp_path / "y.png", len(PNG) - 1)
    raises_code(ErrorCode.INPUT_INVALID, storage.get, url + ".missing", tmp_path / "z.png", 10**6)


# -- S3 through moto's server


def test_s3_private_put_stores_content_type_and_presigns(moto_url: str, bucket: str, s3, png: Path) -> None:
    storage = S3Storage(bucket, "/results/", endpoint_url=moto_url)
    url = storage.put(KEY, png, "image/png")

    head = s3.head_object(Bucket=bucket, Key=f"results/{KEY}")
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(PNG)

    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == moto_url
    assert parts.path == f"/{bucket}/results/{KEY}"  # path-style against a custom endpoint
    assert "X-Amz-Signature=" in parts.query
    assert "X-Amz-Expires=604800" in parts.query
    r = requests.get(url, timeout=10)
    assert r.status_code == 200
    assert r.content == PNG
    assert r.headers["Content-Type"] == "image/png"
    # The bucket is private: without the signature, the same object is refused.
    assert requests.get(url.split("?")[0], timeout=10).status_code == 403


def test_s3_put_overwrites_on_retry(moto_url: str, bucket: str, s3, tmp_path: Path) -> None:
    storage = S3Storage(bucket, endpoint_url=moto_url)
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    first.write_bytes(b"attempt 1")
    second.write_bytes(b"attempt 2")
    storage.put("tts/2026-11-22/7/out.wav", first, "audio/wav")
    storage.put("tts/2026-11-22/7/out.wav", second, "audio/wav")
    body = s3.get_object(Bucket=bucket, Key="tts/2026-11-22/7/out.wav")["Body"].read()
    assert body == b"attempt 2"


def test_s3_public_urls(moto_url: str, bucket: str, s3, png: Path) -> None:
    # A public bucket is the operator's doing: a policy that lets anyone read objects.
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    public = S3Storage(bucket, "p", endpoint_url=moto_url, public=True)
    url = public.put("q/2026-11-22/1/my file.png", png, "image/png")
    assert url == f"{moto_url}/{bucket}/p/q/2026-11-22/1/my%20file.png"
    r = requests.get(url, timeout=10)
    assert r.content == PNG
    assert r.headers["Content-Type"] == "image/png"

    cdn = S3Storage(bucket, endpoint_url=moto_url, public_base_url="https://cdn.example.com/media/")
    assert cdn.put("k.png", png, "image/png") == "https://cdn.example.com/media/k.png"

    aws = S3Storage(bucket, public=True, region="eu-west-1", client=public.client)
    assert aws.url_for("a/b.png") == f"https://{bucket}.s3.eu-west-1.amazonaws.com/a/b.png"


def test_s3_put_failures_are_upload_failed(moto_url: str, png: Path) -> None:
    missing_bucket = S3Storage(f"absent-{uuid.uuid4().hex[:8]}", endpoint_url=moto_url)
    err = raises_code(ErrorCode.UPLOAD_FAILED, missing_bucket.put, KEY, png, "image/png")
    assert err.retryable
    down = S3Storage("b", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    raises_code(ErrorCode.UPLOAD_FAILED, down.put, KEY, png, "image/png")
    raises_code(ErrorCode.UPLOAD_FAILED, missing_bucket.put, KEY, png.with_name("nope.png"), "image/png")


def test_s3_get(moto_url: str, bucket: str, png: Path, tmp_path: Path) -> None:
    storage = S3Storage(bucket, endpoint_url=moto_url)
    storage.put("in/avatar.png", png, "image/png")
    dest = tmp_path / "got" / "avatar.png"
    assert storage.get(f"s3://{bucket}/in/avatar.png", dest, max_bytes=len(PNG)) == dest
    assert dest.read_bytes() == PNG

    too_big = tmp_path / "big.png"
    err = raises_code(
        ErrorCode.INPUT_INVALID, storage.get, f"s3://{bucket}/in/avatar.png", too_big, len(PNG) - 1
    )
    assert not err.retryable
    assert not too_big.exists()
    raises_code(ErrorCode.INPUT_INVALID, storage.get, f"s3://{bucket}/in/nope.png", tmp_path / "n", 10**6)
    raises_code(ErrorCode.INPUT_INVALID, storage.get, "s3://no-such-bucket-x/k", tmp_path / "n", 10**6)
    raises_code(ErrorCode.INPUT_INVALID, storage.get, f"s3://{bucket}", tmp_path / "n", 10**6)

    down = S3Storage("b", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    err = raises_code(ErrorCode.INPUT_FETCH_FAILED, down.get, "s3://b/k", tmp_path / "n", 10**6)
    assert err.retryable


# -- Supabase Storage through supabase-py and the stand-in


def test_supabase_private_put_signs_a_fetchable_url(supa: SupabaseStorageStandIn, png: Path) -> None:
    storage = SupabaseStorage(supa.url, supa.service_role_key, "private", "gpuq")
    url = storage.put(KEY, png, "image/png")

    stored = supa.objects[("private", f"gpuq/{KEY}")]
    assert stored.data == PNG
    assert stored.mimetype == "image/png"
    assert url.startswith(f"{supa.url}/storage/v1/object/sign/private/gpuq/{KEY}?token=")
    r = requests.get(url, timeout=10)
    assert r.status_code == 200
    assert r.content == PNG
    assert r.headers["Content-Type"] == "image/png"
    # The token is bound to that object: it does not open another one.
    other = url.replace(f"/private/gpuq/{KEY}", "/private/gpuq/other.png")
    assert requests.get(other, timeout=10).status_code == 400


def test_supabase_put_overwrites_on_retry(supa: SupabaseStorageStandIn, tmp_path: Path) -> None:
    storage = SupabaseStorage(supa.url, supa.service_role_key, "private")
    path = tmp_path / "out.wav"
    for body in (b"attempt 1", b"attempt 2"):
        path.write_bytes(body)
        storage.put("tts/2026-11-22/8/out.wav", path, "audio/wav")
    assert supa.objects[("private", "tts/2026-11-22/8/out.wav")].data == b"attempt 2"


def test_supabase_public_put(supa: SupabaseStorageStandIn, png: Path) -> None:
    storage = SupabaseStorage(supa.url, supa.service_role_key, "media", public=True)
    url = storage.put(KEY, png, "image/png")
    assert url == f"{supa.url}/storage/v1/object/public/media/{KEY}"
    r = requests.get(url, timeout=10)
    assert r.content == PNG
    assert r.headers["Content-Type"] == "image/png"


def test_supabase_put_failures_are_upload_failed(supa: SupabaseStorageStandIn, png: Path) -> None:
    no_bucket = SupabaseStorage(supa.url, supa.service_role_key, "absent")
    assert (
        "Bucket not found"
        in raises_code(ErrorCode.UPLOAD_FAILED, no_bucket.put, KEY, png, "image/png").message
    )
    anon = SupabaseStorage(supa.url, supa.anon_key, "private")
    raises_code(ErrorCode.UPLOAD_FAILED, anon.put, KEY, png, "image/png")
    down = SupabaseStorage(f"http://127.0.0.1:{closed_port()}", supa.service_role_key, "private")
    raises_code(ErrorCode.UPLOAD_FAILED, down.put, KEY, png, "image/png")
    supa.fail_next(503)
    err = raises_code(
        ErrorCode.UPLOAD_FAILED,
        SupabaseStorage(supa.url, supa.service_role_key, "private").put,
        KEY,
        png,
        "image/png",
    )
    assert err.retryable


def test_supabase_get(supa: SupabaseStorageStandIn, png: Path, tmp_path: Path) -> None:
    storage = SupabaseStorage(supa.url, supa.service_role_key, "private")
    storage.put("in/garment.png", png, "image/png")
    dest = tmp_path / "garment.png"
    assert storage.get("supabase://private/in/garment.png", dest, max_bytes=len(PNG)) == dest
    assert dest.read_bytes() == PNG

    raises_code(ErrorCode.INPUT_INVALID, storage.get, "supabase://private/in/garment.png", tmp_path / "b", 10)
    assert not (tmp_path / "b").exists()
    raises_code(ErrorCode.INPUT_INVALID, storage.get, "supabase://private/in/none.png", tmp_path / "n", 10**6)
    raises_code(ErrorCode.INPUT_INVALID, storage.get, "supabase://absent/in/x.png", tmp_path / "n", 10**6)
    raises_code(ErrorCode.INPUT_INVALID, storage.get, "supabase://private/../x.png", tmp_path / "n", 10**6)
    supa.fail_next(502)
    err = raises_code(
        ErrorCode.INPUT_FETCH_FAILED, storage.get, "supabase://private/in/garment.png", tmp_path / "f", 10**6
    )
    assert err.retryable


# -- the stand-in itself answers as the real server does


def test_standin_error_shapes(supa: SupabaseStorageStandIn) -> None:
    auth = {"Authorization": f"Bearer {supa.service_role_key}", "apikey": supa.service_role_key}
    base = f"{supa.url}/storage/v1/object"
    r = requests.get(f"{base}/private/missing.png", headers=auth, timeout=10)
    assert r.status_code == 400  # the real error handler sends 400 with the status in the body
    assert r.json() == {
        "statusCode": "404",
        "code": "NoSuchKey",
        "error": "not_found",
        "message": "Object not found",
    }
    r = requests.get(
        f"{base}/authenticated/private/x.png", headers={"Authorization": "Bearer bad"}, timeout=10
    )
    assert (r.status_code, r.json()["statusCode"], r.json()["error"]) == (400, "403", "Unauthorized")
    r = requests.get(f"{base}/public/private/x.png", timeout=10)  # a private bucket is no public bucket
    assert r.json()["error"] == "Bucket not found"
    r = requests.get(f"{base}/sign/private/x.png?token=abc.def.ghi", timeout=10)
    assert (r.status_code, r.json()["statusCode"]) == (400, "400")
    r = requests.get(f"{supa.url}/storage/v1/nothing/here", timeout=10)
    assert r.status_code == 404


# -- choosing by URL


def test_storage_from_url_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = storage_from_url("")
    assert isinstance(default, LocalStorage)
    assert default.root == (tmp_path / ".gpuq" / "outputs").resolve()
    for url, root in [
        (str(tmp_path / "o"), tmp_path / "o"),
        ((tmp_path / "f").as_uri(), tmp_path / "f"),
        ("rel/dir", tmp_path / "rel" / "dir"),
    ]:
        storage = storage_from_url(url)
        assert isinstance(storage, LocalStorage)
        assert storage.root == root.resolve()


def test_storage_from_url_s3(moto_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch, png: Path) -> None:
    monkeypatch.setenv("GPUQ_S3_ENDPOINT_URL", moto_url)
    storage = storage_from_url(f"s3://{bucket}/outputs/?public=true")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.public) == (bucket, "outputs", True)
    assert storage.put(KEY, png, "image/png") == f"{moto_url}/{bucket}/outputs/{KEY}"

    monkeypatch.delenv("GPUQ_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    signed = storage_from_url(f"s3://{bucket}?expires_in=600")
    assert "X-Amz-Expires=600" in signed.put(KEY, png, "image/png")
    # a typo must not quietly mean "private": the outputs' URLs would then expire under the app
    with pytest.raises(ValueError, match="public must be true or false, got 'ture'"):
        storage_from_url(f"s3://{bucket}?public=ture")


def test_storage_from_url_supabase(
    supa: SupabaseStorageStandIn, monkeypatch: pytest.MonkeyPatch, png: Path
) -> None:
    monkeypatch.delenv("SUPABASE_URL", raising=False)
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY", raising=False)
    with pytest.raises(ValueError, match="SUPABASE_URL"):
        storage_from_url("supabase://private/x")
    monkeypatch.setenv("SUPABASE_URL", supa.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", supa.service_role_key)
    storage = storage_from_url("supabase://private/jobs")
    assert isinstance(storage, SupabaseStorage)
    url = storage.put(KEY, png, "image/png")
    assert requests.get(url, timeout=10).content == PNG
    assert ("private", f"jobs/{KEY}") in supa.objects


@pytest.mark.parametrize("url", ["ftp://host/x", "s3://", "gs://bucket/x"])
def test_storage_from_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        storage_from_url(url)
