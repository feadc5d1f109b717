"""Storage with the instance's own credentials (GPUQ_STORAGE_CREDENTIALS=instance), as issued by the manager
(manager/credentials.py) and read from the real database with the instance's secret:

- S3: boto3 against moto's server, the keys from moto's STS. The environment's AWS keys are poisoned, so a
  request signed with anything but the issued keys shows in its URL. Renewal is driven through the stored
  expiry (the manager's view) and a clock the storage is given (the worker's view): STS will not issue
  keys for under 900 s, and no test waits for them.
- Supabase: supabase-py against the stand-in with row-level security decided in Postgres by
  sql/supabase/storage_policies.sql, as shipped, under the token the manager signs.
- A whole worker (in this process, its storage given that clock) that keeps writing across a renewal.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import jwt
import pytest
import requests
from PIL import Image

from gpuq.client import Client, InstanceClient, IssuedCredentials, NotAuthorized
from manager.config import ManagerSettings, from_dict
from manager.credentials import Scope, StorageCredentials, StsIssuer, SupabaseTokenIssuer
from tests.conftest import create_database, drop_database, make_settings
from tests.standins.supabase_storage import SupabaseStorageStandIn, sign_jwt
from worker.backends.imageops import ImageOpsBackend
from worker.config import WorkerSettings
from worker.errors import ErrorCode, JobError
from worker.main import Worker
from worker.storage import storage_from_url
from worker.storage.credentials import InstanceCredentials
from worker.storage.s3 import S3Storage
from worker.storage.supabase import SupabaseStorage

ROLE = "arn:aws:iam::123456789012:role/gpuq-workers"
POISON = "AKIAPOISONENVKEY0001"  # the environment's key id: no request of instance storage may carry it
LABEL = "gpuq:test:tryon"
POLICIES = Path(__file__).resolve().parents[2] / "sql" / "supabase" / "storage_policies.sql"
README = Path(__file__).resolve().parents[2] / "README.md"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


class Clock:
    """The worker's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str) -> dict[str, str]:
    """Poisoned environment keys; explicit ones for the test's own (the manager's, an admin's) clients."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", POISON)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "poison")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "GPUQ_S3_ENDPOINT_URL",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    return {
        "endpoint_url": moto_url,
        "region_name": "us-east-1",
        "aws_access_key_id": "AKIAMANAGER000000001",
        "aws_secret_access_key": "manager",
    }


@pytest.fixture
def bucket(aws: dict[str, str]) -> str:
    name = f"gpuq-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **aws).create_bucket(Bucket=name)
    return name


def manager_settings(monkeypatch: pytest.MonkeyPatch, storage_url: str) -> ManagerSettings:
    monkeypatch.setenv("GPUQ_DEPLOYMENT", "test")
    monkeypatch.setenv("GPUQ_STORAGE_URL", storage_url)
    monkeypatch.delenv("GPUQ_WORKER_ENV", raising=False)
    return from_dict({"queues": {"tryon": {"provider": "vast", "backend": "imageops"}}})


@pytest.fixture
def issuer(aws: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch) -> StorageCredentials:
    """The manager's side: STS on moto, the settings a deployment `test` with s3://bucket/gpuq has."""
    ms = manager_settings(monkeypatch, f"s3://{bucket}/gpuq")
    return StorageCredentials(ms, StsIssuer(ROLE, 900, ms.label_prefix, sts=boto3.client("sts", **aws)))


def rented(client: Client) -> InstanceClient:
    """An instance of the deployment, as a rent records one (our label, a secret)."""
    instance_id, secret = client.enroll(["tryon"], label=LABEL)
    return client.as_instance(secret, instance_id)


def key_id(url: str) -> str:
    """The access key id a presigned URL was signed with."""
    return parse_qs(urlsplit(url).query)["X-Amz-Credential"][0].split("/")[0]


def stored_keys(client: Client) -> dict[str, Any]:
    [row] = client.call("select credentials from gpuq.instance_credentials where kind = 's3'")
    return row["credentials"]


def as_if_later(client: Client, minutes: int) -> None:
    """The manager's view of time passing: the stored credentials are that much older."""
    client.conn.execute(
        "update gpuq.instance_credentials set issued_at = issued_at - make_interval(mins => %s), "
        "expires_at = expires_at - make_interval(mins => %s)",
        (minutes, minutes),
    )


def counting(inst: InstanceClient) -> tuple[Callable[[str], IssuedCredentials | None], list[str]]:
    calls: list[str] = []

    def fetch(kind: str) -> IssuedCredentials | None:
        calls.append(kind)
        return inst.credentials(kind)

    return fetch, calls


def raises_code(code: ErrorCode, fn: Callable[..., object], *args: object) -> JobError:
    with pytest.raises(JobError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return info.value


# --- S3 -----------------------------------------------------------------------------------------------


def test_s3_writes_with_the_instances_own_keys_reads_the_database_only_near_expiry_and_takes_renewed_ones(
    client: Client, issuer: StorageCredentials, aws: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    inst = rented(client)
    issuer.renew(client)
    first = stored_keys(client)
    clock = Clock()
    storage = S3Storage(
        bucket, "gpuq", endpoint_url=aws["endpoint_url"], credentials=InstanceCredentials("s3", clock=clock)
    )
    fetch, calls = counting(inst)
    storage.use_instance_credentials(fetch)
    out = tmp_path / "out.png"
    out.write_bytes(PNG)

    urls = [storage.put(f"tryon/2026-11-22/{n}/1/out.png", out, "image/png") for n in range(3)]
    assert {key_id(u) for u in urls} == {first["access_key_id"]} and POISON not in str(urls)
    assert calls == ["s3"]  # one read of the database for three uploads
    # signed with temporary keys, a URL lives no longer than they do
    assert int(parse_qs(urlsplit(urls[0]).query)["X-Amz-Expires"][0]) <= 900
    assert requests.get(urls[0], timeout=10).content == PNG

    # 8 minutes on: the manager renews (less than half their life left)...
    as_if_later(client, 8)
    issuer.renew(client)
    second = stored_keys(client)
    assert second["access_key_id"] != first["access_key_id"]
    clock.advance(8 * 60)
    url = storage.put("tryon/2026-11-22/4/1/out.png", out, "image/png")
    assert key_id(url) == first["access_key_id"] and calls == ["s3"]  # ...the worker's still have 7 minutes
    clock.advance(4 * 60)  # 3 minutes left: inside the worker's margin (a quarter of their life)
    url = storage.put("tryon/2026-11-22/5/1/out.png", out, "image/png")
    assert key_id(url) == second["access_key_id"] and calls == ["s3", "s3"]
    listed = boto3.client("s3", **aws).list_objects_v2(Bucket=bucket, Prefix="gpuq/tryon/")
    assert len(listed["Contents"]) == 5


def test_s3_keys_of_an_ended_instance_are_not_renewed_and_stop_at_their_expiry(
    client: Client, issuer: StorageCredentials, aws: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    inst = rented(client)
    issuer.renew(client)
    clock = Clock()
    storage = S3Storage(
        bucket, "gpuq", endpoint_url=aws["endpoint_url"], credentials=InstanceCredentials("s3", clock=clock)
    )
    fetch, calls = counting(inst)
    storage.use_instance_credentials(fetch)
    out = tmp_path / "out.png"
    out.write_bytes(PNG)
    storage.put("tryon/a.png", out, "image/png")

    client.call("select gpuq.record_destroy(%s, 'idle for 30 min')", (inst.instance_id,))
    assert issuer.renew(client) == ([], [])  # nothing to renew: it ended
    assert client.call("select * from gpuq.instance_credentials") == []
    clock.advance(900 - 100)
    storage.put("tryon/b.png", out, "image/png")  # what it holds still works until it expires (STS's rule)
    assert calls == ["s3", "s3"]  # it asked again, and was refused: its secret is dead
    with pytest.raises(NotAuthorized):
        inst.credentials("s3")
    clock.advance(200)
    err = raises_code(ErrorCode.UPLOAD_FAILED, storage.put, "tryon/c.png", out, "image/png")
    assert "credentials expired at" in err.message and "no newer ones were issued" in err.message


def test_s3_before_any_credentials_fails_the_upload_clearly(
    client: Client, aws: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    out.write_bytes(PNG)
    unbound = S3Storage(bucket, endpoint_url=aws["endpoint_url"], credentials=InstanceCredentials("s3"))
    err = raises_code(ErrorCode.UPLOAD_FAILED, unbound.put, "tryon/a.png", out, "image/png")
    assert "never given its instance's s3 credentials" in err.message
    waiting = S3Storage(bucket, endpoint_url=aws["endpoint_url"], credentials=InstanceCredentials("s3"))
    waiting.use_instance_credentials(rented(client).credentials)
    err = raises_code(ErrorCode.UPLOAD_FAILED, waiting.put, "tryon/a.png", out, "image/png")
    assert err.retryable and "has not issued this instance s3 credentials yet" in err.message
    err = raises_code(
        ErrorCode.INPUT_FETCH_FAILED, waiting.get, f"s3://{bucket}/in/a.png", tmp_path / "x", 10
    )
    assert err.retryable


def test_storage_url_with_instance_credentials(monkeypatch: pytest.MonkeyPatch, aws: dict[str, str]) -> None:
    monkeypatch.setenv("GPUQ_STORAGE_CREDENTIALS", "instance")
    s3 = storage_from_url("s3://outputs/gpuq")
    assert isinstance(s3, S3Storage) and s3.credentials is not None and s3.credentials.kind == "s3"
    # Supabase: the project's address alone; a service-role key in the environment is not even read
    monkeypatch.setenv("SUPABASE_URL", "https://project.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "must-not-be-used")
    supa = storage_from_url("supabase://outputs/gpuq")
    assert isinstance(supa, SupabaseStorage) and supa.credentials is not None and supa._storage is None
    monkeypatch.setenv("GPUQ_STORAGE_CREDENTIALS", "instnace")
    with pytest.raises(ValueError, match="GPUQ_STORAGE_CREDENTIALS must be instance or environment"):
        storage_from_url("s3://outputs")
    monkeypatch.setenv("GPUQ_STORAGE_CREDENTIALS", "environment")
    assert storage_from_url("s3://outputs").credentials is None  # type: ignore[attr-defined]


# --- Supabase, with the shipped policies ---------------------------------------------------------------


@pytest.fixture(scope="module")
def supa() -> Iterator[SupabaseStorageStandIn]:
    url = create_database("gpuq_supabase")
    try:
        with SupabaseStorageStandIn(url) as standin:
            assert standin.rls is not None
            standin.rls.run_sql(POLICIES.read_text())
            for name in ("outputs", "uploads", "other"):
                standin.create_bucket(name)
            yield standin
    finally:
        drop_database(url)


def token(supa: SupabaseStorageStandIn, queues: tuple[str, ...] = ("tryon",), lifetime: int = 3600) -> str:
    issuer = SupabaseTokenIssuer(supa.jwt_secret, supa.anon_key, lifetime, "gpuq:test:")
    scope = Scope("outputs", tuple(f"gpuq/{q}/" for q in queues), ("uploads",))
    values, _ = issuer.issue(17, scope)
    return values["token"]


def worker_storage(
    client: Client,
    supa: SupabaseStorageStandIn,
    queues: tuple[str, ...] = ("tryon",),
    bucket: str = "outputs",
) -> SupabaseStorage:
    """A worker's storage for an instance serving `queues`, its token issued as the manager does."""
    inst = rented(client)
    assert inst.instance_id is not None
    values = {"token": token(supa, queues), "apikey": supa.anon_key}
    client.set_instance_credentials(
        inst.instance_id, "supabase", values, datetime.now(UTC) + timedelta(hours=1)
    )
    storage = SupabaseStorage(supa.url, None, bucket, "gpuq", credentials=InstanceCredentials("supabase"))
    storage.use_instance_credentials(inst.credentials)
    return storage


def upload(supa: SupabaseStorageStandIn, bearer: str, bucket: str, name: str) -> requests.Response:
    return requests.post(
        f"{supa.url}/storage/v1/object/{bucket}/{name}",
        headers={"Authorization": f"Bearer {bearer}", "apikey": supa.anon_key, "x-upsert": "true"},
        files={"file": ("out.png", PNG, "image/png")},
        timeout=10,
    )


def test_a_token_writes_under_its_queues_folders_and_overwrites_there(
    client: Client, supa: SupabaseStorageStandIn, tmp_path: Path
) -> None:
    storage = worker_storage(client, supa)
    out = tmp_path / "out.png"
    out.write_bytes(PNG)
    url = storage.put("tryon/2026-11-22/7/1/out.png", out, "image/png")
    assert requests.get(url, timeout=10).content == PNG  # signing needs the read policy: it has it
    out.write_bytes(PNG[::-1])
    storage.put("tryon/2026-11-22/7/1/out.png", out, "image/png")  # upsert: insert, select, update
    assert supa.objects[("outputs", "gpuq/tryon/2026-11-22/7/1/out.png")].data == PNG[::-1]
    [row] = supa.rls.conn.execute(  # type: ignore[union-attr]
        "select owner_id from storage.objects where name = 'gpuq/tryon/2026-11-22/7/1/out.png'"
    ).fetchall()
    assert row[0] == jwt.decode(token(supa), options={"verify_signature": False})["sub"]


@pytest.mark.parametrize(
    ("bucket", "key"),
    [
        ("outputs", "tts/2026-11-22/8/1/out.wav"),  # another queue's folder
        ("outputs", "tryon2/x.png"),  # a folder whose name starts the same
        ("outputs", "x.png"),  # the prefix itself
        ("uploads", "tryon/x.png"),  # a bucket it may read, not write
        ("other", "tryon/x.png"),  # another bucket
    ],
)
def test_a_token_cannot_write_outside_its_folders(
    client: Client, supa: SupabaseStorageStandIn, tmp_path: Path, bucket: str, key: str
) -> None:
    storage = worker_storage(client, supa, bucket=bucket)
    out = tmp_path / "out.png"
    out.write_bytes(PNG)
    err = raises_code(ErrorCode.UPLOAD_FAILED, storage.put, key, out, "image/png")
    assert "new row violates row-level security policy" in err.message
    assert (bucket, f"gpuq/{key}") not in supa.objects


def test_a_token_cannot_overwrite_another_queues_output_nor_climb_out_of_its_folder(
    supa: SupabaseStorageStandIn,
) -> None:
    assert upload(supa, supa.service_role_key, "outputs", "gpuq/tts/9/out.wav").status_code == 200
    before = supa.objects[("outputs", "gpuq/tts/9/out.wav")].data
    r = upload(supa, token(supa), "outputs", "gpuq/tts/9/out.wav")
    assert (r.status_code, r.json()["statusCode"], r.json()["error"]) == (400, "403", "Unauthorized")
    assert supa.objects[("outputs", "gpuq/tts/9/out.wav")].data == before
    for name in ("gpuq/tryon/%2E%2E/tts/x.png", "gpuq/tryon/%2E/x.png"):  # sent as ../ and ./
        r = upload(supa, token(supa), "outputs", name)
        assert r.json()["message"] == "new row violates row-level security policy", name
    # the policies hold a folder to end in "/", should a token ever name one without (or name none)
    claims = jwt.decode(token(supa), options={"verify_signature": False})
    for folders in (["gpuq/try"], ["gpuq"], [""], [], "gpuq/tryon/"):
        forged = sign_jwt({**claims, "gpuq_write": folders}, supa.jwt_secret)
        assert upload(supa, forged, "outputs", "gpuq/tryon2/x.png").json()["statusCode"] == "403", folders
    # the project's public anon key, the apiKey every host has, may do nothing at all
    assert upload(supa, supa.anon_key, "outputs", "gpuq/tryon/x.png").json()["statusCode"] == "403"


def test_a_token_reads_its_input_buckets_and_its_folders_only(
    client: Client, supa: SupabaseStorageStandIn, tmp_path: Path
) -> None:
    for bucket, name in (("uploads", "in/a.png"), ("other", "in/a.png"), ("outputs", "gpuq/tts/1/out.png")):
        assert upload(supa, supa.service_role_key, bucket, name).status_code == 200
    storage = worker_storage(client, supa)
    got = storage.get("supabase://uploads/in/a.png", tmp_path / "a.png", 10**6)
    assert got.read_bytes() == PNG
    for url in ("supabase://other/in/a.png", "supabase://outputs/gpuq/tts/1/out.png"):
        err = raises_code(ErrorCode.INPUT_INVALID, storage.get, url, tmp_path / "x.png", 10**6)
        assert "Object not found" in err.message


def test_expired_and_badly_signed_tokens_are_refused_as_supabase_refuses_them(
    supa: SupabaseStorageStandIn,
) -> None:
    now = int(time.time())
    claims = jwt.decode(token(supa), options={"verify_signature": False})
    cases = {
        '"exp" claim timestamp check failed': sign_jwt(
            {**claims, "iat": now - 7200, "exp": now - 60}, supa.jwt_secret
        ),
        "signature verification failed": jwt.encode(
            claims, "another-projects-secret-of-32-chars!", algorithm="HS256"
        ),
        '"alg" (Algorithm) Header Parameter value not allowed': jwt.encode(
            claims, supa.jwt_secret, algorithm="HS512"
        ),
        "Invalid Compact JWS": "not-a-jwt",
    }
    for message, bearer in cases.items():
        r = upload(supa, bearer, "outputs", "gpuq/tryon/x.png")
        assert r.status_code == 400  # the real error handler's HTTP status; the meaning is in the body
        assert r.json() == {
            "statusCode": "403",
            "code": "AccessDenied",
            "error": "Unauthorized",
            "message": message,
        }
    assert ("outputs", "gpuq/tryon/x.png") not in supa.objects


def test_an_expired_token_that_was_not_renewed_fails_the_upload(
    client: Client, supa: SupabaseStorageStandIn, tmp_path: Path
) -> None:
    inst = rented(client)
    assert inst.instance_id is not None
    clock = Clock()
    short = token(supa, lifetime=60)
    expires = datetime.now(UTC) + timedelta(seconds=60)
    client.set_instance_credentials(
        inst.instance_id, "supabase", {"token": short, "apikey": supa.anon_key}, expires
    )
    storage = SupabaseStorage(
        supa.url, None, "outputs", "gpuq", credentials=InstanceCredentials("supabase", clock=clock)
    )
    storage.use_instance_credentials(inst.credentials)
    out = tmp_path / "out.png"
    out.write_bytes(PNG)
    storage.put("tryon/a.png", out, "image/png")
    client.call("select gpuq.revoke_instance(%s)", (inst.instance_id,))  # ended: nothing more is issued
    clock.advance(61)
    err = raises_code(ErrorCode.UPLOAD_FAILED, storage.put, "tryon/b.png", out, "image/png")
    assert "credentials expired" in err.message


def test_the_readme_ships_the_policies_file_as_is() -> None:
    blocks = re.findall(r"```pgsql\n(.*?)```", README.read_text(), flags=re.S)
    assert POLICIES.read_text() in blocks


# --- a whole worker ------------------------------------------------------------------------------------


def test_a_worker_keeps_writing_across_a_renewal_without_restarting(
    client: Client,
    issuer: StorageCredentials,
    aws: dict[str, str],
    bucket: str,
    db_url: str,
    tmp_path: Path,
) -> None:
    inst = rented(client)
    s3 = boto3.client("s3", **aws)
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 6), (10, 20, 30)).save(image)
    s3.upload_file(str(image), bucket, "in/a.png")
    settings = make_settings(db_url, tmp_path)
    env = {
        "GPUQ_QUEUES": "tryon=imageops",
        "GPUQ_STORAGE_URL": f"s3://{bucket}/gpuq",
        "GPUQ_INSTANCE_SECRET": inst.secret,
        "GPUQ_PROVIDER": "vast",
        "GPUQ_SPOT_WATCH": "0",
        "GPUQ_HEARTBEAT_SECONDS": "2",
    }
    config = WorkerSettings.from_env(settings, env)
    clock = Clock()
    storage = S3Storage(
        bucket, "gpuq", endpoint_url=aws["endpoint_url"], credentials=InstanceCredentials("s3", clock=clock)
    )
    worker = Worker(db_url, settings, config, {"imageops": ImageOpsBackend()}, storage)
    issuer.renew(client)  # the manager's tick after the rent
    first = stored_keys(client)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:

        def run_job() -> dict[str, Any]:
            job_id = client.enqueue("tryon", {"image": f"s3://{bucket}/in/a.png", "ops": [{"op": "invert"}]})
            job = client.wait(job_id, timeout=60)
            assert job.status == "succeeded", (job.error_code, job.error_message)
            assert job.result is not None
            return job.result["outputs"][0]

        one = run_job()
        assert key_id(one["url"]) == first["access_key_id"]
        as_if_later(client, 8)
        issuer.renew(client)  # the manager's tick 8 minutes on
        second = stored_keys(client)
        clock.advance(12 * 60)  # and the worker's clock, to 3 minutes before the first keys expire
        two = run_job()
        assert key_id(two["url"]) == second["access_key_id"] != first["access_key_id"]
        assert thread.is_alive() and worker.instance_id == inst.instance_id  # the same worker all along
        for output in (one, two):
            assert requests.get(output["url"], timeout=10).status_code == 200
    finally:
        worker.request_drain("test over", now=True)
        thread.join(30)
    assert not thread.is_alive()
