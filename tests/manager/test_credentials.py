"""The manager issues each live instance its own storage credentials: STS keys narrowed by a session policy
(on moto's STS, which does not enforce policies: the policy's content is checked here itself), or a
Supabase Storage JWT; renewed each tick before they expire, never for an instance that has ended; and no
long-lived key, nor any manager secret, in what a rented host is started with (EC2 user data included)."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import jwt
import pytest

from gpuq.client import Client, NotAuthorized, new_secret, secret_hash
from manager.bootstrap import launch_spec
from manager.config import ManagerSettings, from_dict
from manager.credentials import (
    MAX_SESSION_POLICY,
    CredentialsRefused,
    Scope,
    StorageCredentials,
    StsIssuer,
    SupabaseTokenIssuer,
    host_env,
    s3_session_policy,
    scope_for,
)
from manager.metrics import Metrics
from manager.providers.aws_spot import build_user_data
from manager.providers.base import Offer
from manager.providers.vast import VastProvider
from manager.tick import Manager, tick
from tests.manager.conftest import VAST_KEY
from tests.standins.vast_server import VastStandin

ROLE = "arn:aws:iam::123456789012:role/gpuq-workers"
WORKER_URL = "postgresql://gpuq_worker:w0rker-pw@db.example:5432/app"
JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
ANON = jwt.encode({"role": "anon", "iss": "supabase"}, JWT_SECRET, algorithm="HS256")
MANAGER_KEYS = {
    "AWS_ACCESS_KEY_ID": "AKIAMANAGERKEY000001",
    "AWS_SECRET_ACCESS_KEY": "manager/secret/0123456789",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A manager that rents on Vast and AWS, with STS configured, its own AWS keys and no AWS config."""
    for name in ("GPUQ_DAILY_BUDGET", "GPUQ_MAX_TOTAL_DPH", "GPUQ_MANAGER_PROVIDERS", "GPUQ_WORKER_ENV"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SUPABASE_JWT_SECRET", "SUPABASE_ANON_KEY", "SUPABASE_URL", "GPUQ_CREDENTIALS_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in MANAGER_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("GPUQ_DEPLOYMENT", "test")
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", WORKER_URL)
    monkeypatch.setenv("GPUQ_INSTALL_SPEC", "gpuq==0.1.0 --hash=sha256:" + "0" * 64)
    monkeypatch.setenv("VAST_API_KEY", VAST_KEY)
    monkeypatch.setenv("GPUQ_STORAGE_URL", "s3://outputs/gpuq")
    monkeypatch.setenv("GPUQ_S3_ROLE_ARN", ROLE)


def settings(**queues: dict[str, Any]) -> ManagerSettings:
    base = {"provider": "vast", "backend": "imageops", "max_instances": 2, "target_jobs_per_instance": 2}
    return from_dict(
        {"daily_budget": 50, "max_total_dph": 5, "queues": {q: {**base, **v} for q, v in queues.items()}}
    )


# --- the session policy, read as IAM reads it ------------------------------------------------------------


def allows(policy: dict[str, Any], action: str, bucket: str, key: str) -> bool:
    """Whether `policy` allows `action` on s3://bucket/key: IAM's Allow statements, ARN wildcards (* any
    run of characters, "/" included; ? one character), nothing else granted."""
    arn = f"arn:aws:s3:::{bucket}/{key}"
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and set(st) == {"Sid", "Effect", "Action", "Resource"}
        if action in st["Action"] and any(fnmatch.fnmatchcase(arn, r) for r in st["Resource"]):
            return True
    return False


@pytest.mark.usefixtures("env")
def test_the_session_policy_is_exactly_its_queues_folders_and_the_input_buckets() -> None:
    ms = settings(tryon={"env": {"GPUQ_INPUT_BUCKETS": "s3://uploads,supabase://avatars"}}, tts={}, tryon2={})
    scope = scope_for(ms, ["tryon"])
    assert scope == Scope("outputs", ("gpuq/tryon/",), ("uploads",))  # the Supabase bucket is not S3's
    policy = s3_session_policy(scope)
    assert policy == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "WriteOwnQueues",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": ["arn:aws:s3:::outputs/gpuq/tryon/*"],
            },
            {
                "Sid": "ReadOwnOutputsAndInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": ["arn:aws:s3:::outputs/gpuq/tryon/*", "arn:aws:s3:::uploads/*"],
            },
        ],
    }
    out = "gpuq/tryon/2026-11-22/7/1/out.png"
    assert allows(policy, "s3:PutObject", "outputs", out)
    assert allows(policy, "s3:GetObject", "outputs", out)  # its presigned URL
    assert allows(policy, "s3:GetObject", "uploads", "users/9/garment.png")
    # another queue's folder, one whose name starts the same, the prefix itself, other buckets: no
    for bucket, key in [
        ("outputs", "gpuq/tts/2026-11-22/8/1/out.wav"),
        ("outputs", "gpuq/tryon2/2026-11-22/9/1/out.png"),
        ("outputs", "gpuq/tryon"),
        ("outputs", "gpuq/other.png"),
        ("outputs", "tryon/x.png"),
        ("uploads", "gpuq/tryon/x.png"),
        ("avatars", "gpuq/tryon/x.png"),
    ]:
        assert not allows(policy, "s3:PutObject", bucket, key), (bucket, key)
    assert not allows(policy, "s3:GetObject", "outputs", "gpuq/tts/2026-11-22/8/1/out.wav")
    for action in ("s3:DeleteObject", "s3:ListBucket", "s3:PutObjectAcl", "s3:*", "iam:PassRole"):
        assert not allows(policy, action, "outputs", out)

    # Without GPUQ_INPUT_BUCKETS a worker reads the output bucket (its default); so may its keys.
    tts = s3_session_policy(scope_for(ms, ["tts"]))
    assert tts["Statement"][1]["Resource"] == ["arn:aws:s3:::outputs/gpuq/tts/*", "arn:aws:s3:::outputs/*"]
    assert not allows(tts, "s3:PutObject", "outputs", out)


@pytest.mark.usefixtures("env")
def test_the_policy_names_the_roles_partition_and_fits_awss_limit() -> None:
    scope = Scope("outputs", ("gpuq/q/",), ())
    assert s3_session_policy(scope, "aws-cn")["Statement"][0]["Resource"] == [
        "arn:aws-cn:s3:::outputs/gpuq/q/*"
    ]
    wide = Scope("outputs", tuple(f"gpuq/queue-number-{i:03d}/" for i in range(60)), ())
    issuer = StsIssuer(ROLE, 900, "gpuq:test:", sts=object())
    with pytest.raises(CredentialsRefused, match=f"over AWS's {MAX_SESSION_POLICY}"):
        issuer.issue(1, wide)


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"GPUQ_STORAGE_URL": "s3://outputs/gp*q"}, "may hold only letters, digits and . _ - /"),
        ({"GPUQ_STORAGE_URL": "s3://outputs/${aws:username}"}, "may hold only letters"),
        ({"GPUQ_STORAGE_URL": "supabase://outputs/gpuq"}, "GPUQ_S3_ROLE_ARN issues S3 keys"),
        ({"GPUQ_S3_ROLE_ARN": "gpuq-workers"}, "must be an IAM role ARN"),
        ({"GPUQ_S3_ROLE_ARN": "arn:aws:iam::1:user/me"}, "must be an IAM role ARN"),
        ({"GPUQ_CREDENTIALS_SECONDS": "600"}, "must be between 900 and 43200"),
        ({"GPUQ_CREDENTIALS_SECONDS": "1h"}, "must be a whole number of seconds"),
        ({"GPUQ_CREDENTIALS_SECONDS": "900", "GPUQ_MANAGER_TICK_SECONDS": "300"}, "at least 4 ticks"),
        ({"GPUQ_WORKER_ENV": "AWS_SESSION_TOKEN"}, "GPUQ_WORKER_ENV names AWS_SESSION_TOKEN"),
    ],
)
def test_bad_credential_settings_stop_the_manager(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, str], message: str
) -> None:
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        StorageCredentials.from_settings(settings(q={}))
    assert message in str(caught.value)


@pytest.mark.usefixtures("env")
def test_with_sts_a_rented_queue_may_not_hand_out_long_lived_aws_keys() -> None:
    own = {"AWS_ACCESS_KEY_ID": "AKIAWORKERKEY0000001", "AWS_SECRET_ACCESS_KEY": "worker/secret/000000000"}
    with pytest.raises(SystemExit, match=r"queues\.q\.env sets AWS_ACCESS_KEY_ID, but rented hosts get"):
        StorageCredentials.from_settings(settings(q={"env": own}))
    StorageCredentials.from_settings(settings(q={"env": own, "provider": "local"}))  # runs here: allowed


# --- what a rented host is started with ---------------------------------------------------------------


@pytest.mark.usefixtures("env")
def test_ec2_user_data_carries_no_storage_key_and_no_manager_secret() -> None:
    ms = settings(q={"provider": "aws_spot"})
    offer = Offer("aws_spot", "g5.xlarge/us-east-1a", "A10G", 1, 22888, 0.5, True, bid=0.4)
    spec = launch_spec(ms, "q", offer)
    spec = type(spec)(**{**spec.__dict__, "env": {**spec.env, "GPUQ_INSTANCE_SECRET": new_secret()}})
    user_data = build_user_data(spec)
    exported = dict(
        line[len("export ") :].split("=", 1) for line in user_data.splitlines() if line.startswith("export ")
    )
    assert exported["GPUQ_STORAGE_CREDENTIALS"] == "instance"
    for value in [*MANAGER_KEYS.values(), VAST_KEY, "AWS_", "SUPABASE_SERVICE", "SUPABASE_JWT"]:
        assert value not in user_data
    # What is secret in it, and why it may be there: the shared worker login (it can do nothing without
    # a live instance secret) and the instance secret (replaced at registration; dead from then on).
    secretish = {
        n for n in exported if any(w in n for w in ("KEY", "SECRET", "TOKEN", "PASSWORD", "DATABASE"))
    }
    assert secretish == {"DATABASE_URL", "GPUQ_INSTANCE_SECRET"}
    assert host_env(ms) == {"GPUQ_STORAGE_CREDENTIALS": "instance"}


# --- STS on moto ---------------------------------------------------------------------------------------


@pytest.fixture
def sts(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """The manager's STS client against moto, and the AssumeRole requests it sends."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_url)
    client = boto3.client("sts", region_name="us-east-1")
    sent: list[dict[str, Any]] = []
    client.meta.events.register(
        "before-call.sts.AssumeRole", lambda params, **kw: sent.append(params["body"])
    )
    yield client, sent


@pytest.mark.usefixtures("env")
def test_sts_issues_short_lived_keys_under_the_session_policy(sts: tuple[Any, list[dict[str, Any]]]) -> None:
    client, sent = sts
    issuer = StsIssuer(ROLE, 900, "gpuq:test:", sts=client)
    scope = Scope("outputs", ("gpuq/tryon/",), ("uploads",))
    values, expires = issuer.issue(17, scope)
    assert set(values) == {"access_key_id", "secret_access_key", "session_token"}
    assert values["access_key_id"].startswith("ASIA")  # temporary keys, not the manager's
    assert values["access_key_id"] != MANAGER_KEYS["AWS_ACCESS_KEY_ID"]
    assert timedelta(seconds=890) < expires - datetime.now(UTC) <= timedelta(seconds=900)
    [request] = sent
    assert request["RoleArn"] == ROLE and request["DurationSeconds"] == 900
    assert request["RoleSessionName"] == "gpuq-test-17"  # CloudTrail names the instance
    assert json.loads(request["Policy"]) == s3_session_policy(scope)


# --- whole ticks: issue, renew, stop -------------------------------------------------------------------


def stored(db: Client) -> dict[int, dict[str, Any]]:
    rows = db.call("select instance_id, credentials, issued_at, expires_at from gpuq.instance_credentials")
    return {r["instance_id"]: r for r in rows}


@pytest.mark.usefixtures("env", "sts")
def test_ticks_issue_credentials_renew_them_and_stop_when_the_instance_ends(
    client: Client, vast: VastProvider, standin: VastStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUQ_CREDENTIALS_SECONDS", "900")
    client.conn.execute("truncate gpuq.avoided_machines, gpuq.manager_ticks")
    standin.add_offer(dph_base=0.40, min_bid=0.20)
    client.enqueue("tryon", {"n": 1})
    m = Manager(client, settings(tryon={"max_instances": 1}), {"vast": vast}, Metrics(), echo=lambda _: None)

    first = tick(m)
    assert not first.errors and len(first.rented) == 1
    [rental] = standin.rentals.values()
    assert rental.env["GPUQ_STORAGE_CREDENTIALS"] == "instance"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(rental.env)
    assert not any(v in str(rental.env) for v in MANAGER_KEYS.values())
    # issued in the tick that rented it, before its worker is even up
    [(instance_id, row)] = stored(client).items()
    keys = row["credentials"]
    assert keys["access_key_id"].startswith("ASIA")

    # Its worker (the secret from its environment, replaced at registration) reads them; nobody else can.
    fresh = new_secret()
    client.as_instance(rental.env["GPUQ_INSTANCE_SECRET"]).register(new_secret_hash=secret_hash(fresh))
    got = client.as_instance(fresh).credentials("s3")
    assert got is not None and got.values == keys

    # A tick while plenty of their life is left issues nothing.
    assert not tick(m).errors
    assert stored(client)[instance_id]["credentials"] == keys

    # Once less than half is left (as if 8 minutes had passed), the next tick renews them.
    client.conn.execute(
        "update gpuq.instance_credentials set issued_at = issued_at - interval '8 minutes', "
        "expires_at = expires_at - interval '8 minutes'"
    )
    before = stored(client)[instance_id]["expires_at"]
    assert not tick(m).errors
    renewed = stored(client)[instance_id]
    assert renewed["credentials"]["access_key_id"] != keys["access_key_id"]
    assert renewed["expires_at"] > before + timedelta(minutes=7)
    assert client.as_instance(fresh).credentials("s3").values == renewed["credentials"]  # type: ignore[union-attr]

    # Outbid: the tick destroys it. Its credentials go at once, and no tick renews them.
    standin.outbid(int(rental.id))
    assert not tick(m).errors
    [row] = client.call("select status::text, end_reason from gpuq.instances where id = %s", (instance_id,))
    assert row["status"] in ("terminated", "failed") and "outbid" in row["end_reason"]
    assert stored(client) == {}
    with pytest.raises(NotAuthorized):
        client.as_instance(fresh).credentials("s3")
    assert not tick(m).errors
    assert stored(client) == {}


# --- Supabase tokens ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("env")
def test_a_supabase_token_names_the_instance_its_folders_and_inputs_and_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GPUQ_S3_ROLE_ARN")
    monkeypatch.setenv("GPUQ_STORAGE_URL", "supabase://outputs/gpuq")
    monkeypatch.setenv("SUPABASE_URL", "https://project.supabase.co")
    monkeypatch.setenv("SUPABASE_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("SUPABASE_ANON_KEY", ANON)
    ms = settings(tryon={"env": {"GPUQ_INPUT_BUCKETS": "supabase://uploads,s3://elsewhere"}})
    creds = StorageCredentials.from_settings(ms)
    assert isinstance(creds.issuer, SupabaseTokenIssuer)
    assert creds.host_env() == {
        "GPUQ_STORAGE_CREDENTIALS": "instance",
        "SUPABASE_URL": "https://project.supabase.co",
    }
    assert JWT_SECRET not in repr(creds)  # a repr in a log shows no secret of the environment's
    values, expires = creds.issuer.issue(17, scope_for(ms, ["tryon"]))
    assert values["apikey"] == ANON  # the public key; the token carries the rights
    claims = jwt.decode(values["token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["role"] == "gpuq_storage_worker"
    assert claims["exp"] - claims["iat"] == 3600 and claims["exp"] == int(expires.timestamp())
    assert (claims["gpuq_instance"], claims["gpuq_bucket"]) == (17, "outputs")
    assert (claims["gpuq_write"], claims["gpuq_read"]) == (["gpuq/tryon/"], ["uploads"])
    assert (
        claims["sub"]
        != SupabaseTokenIssuer(JWT_SECRET, ANON, 3600, "gpuq:test:").claims(18, scope_for(ms, ["tryon"]), 0)[
            "sub"
        ]
    )


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"SUPABASE_ANON_KEY": ""}, "set SUPABASE_ANON_KEY (or SUPABASE_PUBLISHABLE_KEY)"),
        (
            {"SUPABASE_ANON_KEY": jwt.encode({"role": "service_role"}, "k" * 32, algorithm="HS256")},
            "carries a Supabase service-role key",
        ),
        ({"SUPABASE_ANON_KEY": "sb_secret_0123456789abcdef"}, "carries a Supabase secret key"),
        ({"SUPABASE_JWT_SECRET": "short"}, "shorter than Supabase's"),
        ({"SUPABASE_URL": ""}, "set SUPABASE_URL too"),
        ({"GPUQ_WORKER_ENV": "SUPABASE_SERVICE_ROLE_KEY"}, "GPUQ_WORKER_ENV names SUPABASE_SERVICE_ROLE_KEY"),
    ],
)
def test_bad_supabase_token_settings_stop_the_manager(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, str], message: str
) -> None:
    monkeypatch.delenv("GPUQ_S3_ROLE_ARN")
    monkeypatch.setenv("GPUQ_STORAGE_URL", "supabase://outputs/gpuq")
    monkeypatch.setenv("SUPABASE_URL", "https://project.supabase.co")
    monkeypatch.setenv("SUPABASE_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("SUPABASE_ANON_KEY", ANON)
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        StorageCredentials.from_settings(settings(q={}))
    assert message in str(caught.value)
    assert JWT_SECRET not in str(caught.value)


@pytest.mark.usefixtures("env")
def test_nothing_is_issued_without_a_role_or_a_jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUQ_S3_ROLE_ARN")
    ms = settings(q={})
    assert StorageCredentials.from_settings(ms).issuer is None
    assert host_env(ms) == {}
    # the JWT secret alone, with S3 storage, is no reason to issue Supabase tokens
    monkeypatch.setenv("SUPABASE_JWT_SECRET", JWT_SECRET)
    assert StorageCredentials.from_settings(ms).issuer is None
