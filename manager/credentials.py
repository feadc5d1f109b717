"""Each rented instance's own storage credentials: issued by the manager, short-lived, scoped to its queues.

A rented host never gets the owner's storage keys. Instead, every tick, the manager gives each live
instance it rented (our label, a secret, not ended) credentials of its own for the output storage
(GPUQ_STORAGE_URL), valid GPUQ_CREDENTIALS_SECONDS, and renews them once half of that is left. It stores
them in the database (sql 0008, gpuq.set_instance_credentials), where only that instance's worker can read
them, with its instance secret; when the instance ends they are deleted and never renewed again. Hosts are
told to use them with GPUQ_STORAGE_CREDENTIALS=instance (host_env).

- s3:// with GPUQ_S3_ROLE_ARN: STS AssumeRole of that role with a session policy (s3_session_policy)
  that lets the keys write (PutObject, AbortMultipartUpload) only under its queues' folders of the output
  bucket, and read (GetObject) only those folders and the input buckets. A session policy can only narrow
  the role's own policy: the role needs at least these rights, and a trust policy that lets the
  manager's AWS identity assume it. Keys already issued stay valid at AWS until they expire (STS cannot
  revoke one session): what ends with the instance is their renewal and the host's way of reading them.
- supabase:// with SUPABASE_JWT_SECRET: a JWT signed with the project's (legacy, HS256) JWT secret, role
  gpuq_storage_worker, whose claims name the instance, its folders and the buckets it may read;
  sql/supabase/storage_policies.sql (applied once, in the Supabase project) turns those claims into
  storage.objects row-level security. The host sends it with the project's public anon (or publishable)
  key, SUPABASE_ANON_KEY, as `apiKey`.

What one instance may do is its Scope: write under "<prefix>/<queue>/" of the output bucket for each queue it
serves, read those folders and the input buckets (the queue's GPUQ_INPUT_BUCKETS, as its worker gets them;
by default the output bucket, as the worker's own default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt

from gpuq.client import Client, GpuqError
from gpuq.settings import SettingError
from manager.config import ManagerSettings, secret_in
from worker.config import parse_input_buckets
from worker.inputs import safe_name

log = logging.getLogger("gpuq.manager")

DEFAULT_LIFETIME_S = 3600
MIN_LIFETIME_S = 900  # STS's floor for AssumeRole
MAX_LIFETIME_S = 43200  # STS's ceiling (the role's MaxSessionDuration may be lower)
RENEW_SHARE = 0.5  # renew once less than this share of the lifetime is left
SUPABASE_ROLE = "gpuq_storage_worker"  # the Postgres role sql/supabase/storage_policies.sql grants
MAX_SESSION_POLICY = 2048  # characters: AWS's limit on an inline session policy
# What may stand in a bucket name or key prefix that goes into an ARN or a policy: no ARN wildcard (* ?),
# no policy variable (${…}), nothing to escape.
_PLAIN = re.compile(r"^[A-Za-z0-9._/-]*$")
_SESSION_NAME = re.compile(r"[^\w+=,.@-]")
_INSTANCE_NAMESPACE = uuid.UUID("7c0a3c52-5f7e-4c47-9a55-3a8f0b6e2d11")  # JWT subjects: uuid5(this, label…)

# Manager environment variables this module reads (the README's configuration table lists them).
ROLE_ARN = "GPUQ_S3_ROLE_ARN"
LIFETIME = "GPUQ_CREDENTIALS_SECONDS"
JWT_SECRET = "SUPABASE_JWT_SECRET"
ANON_KEYS = ("SUPABASE_ANON_KEY", "SUPABASE_PUBLISHABLE_KEY")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SUPABASE_KEYS = ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SERVICE_KEY", "SUPABASE_SECRET_KEY")


class CredentialsRefused(Exception):
    """Credentials for one instance could not be issued (the message names why, never a secret)."""


@dataclass(frozen=True)
class Scope:
    """What one instance's credentials allow."""

    bucket: str  # the output bucket
    write_prefixes: tuple[str, ...]  # "<prefix>/<queue>/" for each queue it serves
    read_buckets: tuple[str, ...]  # whole buckets it may read (inputs)


def _storage_location(storage_url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of an s3:// or supabase:// storage URL, checked for what a policy holds."""
    parts = urlsplit(storage_url.strip())
    bucket, prefix = parts.netloc, unquote(parts.path).strip("/")
    if parts.scheme not in ("s3", "supabase") or not bucket:
        raise SettingError(
            f"GPUQ_STORAGE_URL must be s3://bucket/prefix or supabase://bucket/prefix, got {parts.scheme}://…"
        )
    if not _PLAIN.match(bucket) or "/" in bucket or not _PLAIN.match(prefix) or "//" in prefix:
        raise SettingError(
            "GPUQ_STORAGE_URL: instance credentials are scoped by bucket and prefix, which may hold only "
            f"letters, digits and . _ - / (no * ? $ or empty segments); got {bucket!r}, {prefix!r}"
        )
    return parts.scheme, bucket, prefix


def scope_for(ms: ManagerSettings, queues: Sequence[str], environ: Mapping[str, str] = os.environ) -> Scope:
    """The scope of an instance serving `queues`, from the output storage and each queue's input buckets."""
    assert ms.storage_url is not None
    scheme, bucket, prefix = _storage_location(ms.storage_url)
    lead = f"{prefix}/" if prefix else ""
    write = tuple(f"{lead}{safe_name(q, 'default')}/" for q in dict.fromkeys(queues))
    read: list[str] = []
    for q in queues:
        read += [b for b in _input_buckets(ms, q, environ) if b not in read]
    names = tuple(b.split("://", 1)[1] for b in read if b.startswith(f"{scheme}://"))
    return Scope(bucket, write, names)


def _input_buckets(ms: ManagerSettings, queue: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The "scheme://bucket" entries the queue's workers read inputs from, as their GPUQ_INPUT_BUCKETS
    comes to them (the queue's env, else the manager's value when GPUQ_WORKER_ENV passes it on), else
    the worker's default: the output bucket."""
    launch = ms.launch.get(queue)
    raw = launch.env.get("GPUQ_INPUT_BUCKETS") if launch is not None else None
    if raw is None and "GPUQ_INPUT_BUCKETS" in ms.worker_env_names:
        raw = environ.get("GPUQ_INPUT_BUCKETS")
    if raw:
        found = parse_input_buckets(raw)
        for entry in found:
            if not _PLAIN.match(entry.split("://", 1)[1]):
                raise SettingError(f"GPUQ_INPUT_BUCKETS of queue {queue}: {entry!r} cannot go in a policy")
        return found
    assert ms.storage_url is not None
    parts = urlsplit(ms.storage_url.strip())
    return (f"{parts.scheme}://{parts.netloc}",)


# --- S3: STS AssumeRole with a session policy ------------------------------------------------------------


def s3_session_policy(scope: Scope, partition: str = "aws") -> dict[str, Any]:
    """The session policy of one instance's keys: write under its queues' folders only; read those
    folders (the presigned URLs of its outputs are GETs signed with these keys) and the input buckets."""
    own = [f"arn:{partition}:s3:::{scope.bucket}/{p}*" for p in scope.write_prefixes]
    inputs = [f"arn:{partition}:s3:::{b}/*" for b in scope.read_buckets]
    statements: list[dict[str, Any]] = []
    if own:
        statements.append(
            {
                "Sid": "WriteOwnQueues",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": own,
            }
        )
    if own or inputs:
        statements.append(
            {
                "Sid": "ReadOwnOutputsAndInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": list(dict.fromkeys(own + inputs)),
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


class StsIssuer:
    """Temporary S3 keys from STS AssumeRole, narrowed to one instance's scope by a session policy."""

    kind = "s3"

    def __init__(self, role_arn: str, lifetime_s: int, label_prefix: str, sts: Any = None) -> None:
        parts = role_arn.split(":")
        if len(parts) < 6 or parts[0] != "arn" or parts[2] != "iam" or not parts[5].startswith("role/"):
            raise SettingError(
                f"{ROLE_ARN} must be an IAM role ARN, arn:aws:iam::ACCOUNT:role/NAME; got {role_arn!r}"
            )
        self.role_arn = role_arn
        self.partition = parts[1]
        self.lifetime_s = lifetime_s
        self.label_prefix = label_prefix
        if sts is None:
            import boto3
            from botocore.config import Config

            # the manager's own AWS identity; AWS_ENDPOINT_URL_STS (or AWS_ENDPOINT_URL) points it elsewhere
            region = os.environ.get("GPUQ_AWS_REGION") or os.environ.get("AWS_REGION")
            sts = boto3.client("sts", region_name=region, config=Config(retries={"mode": "standard"}))
        self.sts = sts

    def session_name(self, instance_id: int) -> str:
        """Shown in CloudTrail for everything these keys do: the deployment's label and the instance."""
        return _SESSION_NAME.sub("-", f"{self.label_prefix}{instance_id}")[-64:]

    def issue(self, instance_id: int, scope: Scope) -> tuple[dict[str, Any], datetime]:
        from botocore.exceptions import BotoCoreError, ClientError

        policy = json.dumps(s3_session_policy(scope, self.partition), separators=(",", ":"))
        if len(policy) > MAX_SESSION_POLICY:
            raise CredentialsRefused(
                f"its session policy is {len(policy)} characters, over AWS's {MAX_SESSION_POLICY}: "
                "it serves or reads too many queues or buckets"
            )
        try:
            answer = self.sts.assume_role(
                RoleArn=self.role_arn,
                RoleSessionName=self.session_name(instance_id),
                Policy=policy,
                DurationSeconds=self.lifetime_s,
            )
        except (ClientError, BotoCoreError) as e:
            raise CredentialsRefused(f"STS AssumeRole of {self.role_arn}: {e}") from None
        c = answer["Credentials"]
        values = {
            "access_key_id": c["AccessKeyId"],
            "secret_access_key": c["SecretAccessKey"],
            "session_token": c["SessionToken"],
        }
        return values, c["Expiration"]


# --- Supabase Storage: a JWT for role gpuq_storage_worker ------------------------------------------------


class SupabaseTokenIssuer:
    """A short-lived HS256 JWT per instance, signed with the project's JWT secret, for Storage's RLS."""

    kind = "supabase"

    def __init__(
        self,
        jwt_secret: str,
        apikey: str,
        lifetime_s: int,
        label_prefix: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.jwt_secret = jwt_secret
        self.apikey = apikey
        self.lifetime_s = lifetime_s
        self.label_prefix = label_prefix
        self.clock = clock

    def claims(self, instance_id: int, scope: Scope, now: int) -> dict[str, Any]:
        return {
            "iss": "gpuq",
            # a uuid, as Supabase's own subjects are (storage.objects.owner_id records it)
            "sub": str(uuid.uuid5(_INSTANCE_NAMESPACE, f"{self.label_prefix}{instance_id}")),
            "role": SUPABASE_ROLE,
            "iat": now,
            "exp": now + self.lifetime_s,
            "gpuq_instance": instance_id,
            "gpuq_bucket": scope.bucket,
            "gpuq_write": list(scope.write_prefixes),
            "gpuq_read": list(scope.read_buckets),
        }

    def issue(self, instance_id: int, scope: Scope) -> tuple[dict[str, Any], datetime]:
        now = int(self.clock())
        claims = self.claims(instance_id, scope, now)
        token = jwt.encode(claims, self.jwt_secret, algorithm="HS256")
        return {"token": token, "apikey": self.apikey}, datetime.fromtimestamp(claims["exp"], UTC)


# --- issuing and renewing, each tick -----------------------------------------------------------------------


Issuer = StsIssuer | SupabaseTokenIssuer


@dataclass
class StorageCredentials:
    """Issues and renews the live instances' credentials of one kind. `issuer` None: nothing to issue
    (hosts then use whatever storage credentials their environment gives them)."""

    settings: ManagerSettings = field(repr=False)
    issuer: Issuer | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False)  # holds secrets

    @classmethod
    def from_settings(
        cls, ms: ManagerSettings, environ: Mapping[str, str] = os.environ
    ) -> StorageCredentials:
        """From GPUQ_S3_ROLE_ARN or SUPABASE_JWT_SECRET, checked; SystemExit names what is wrong."""
        try:
            return cls(ms, _issuer(ms, environ), environ)
        except SettingError as e:
            raise SystemExit(f"gpuq manager: {e}") from None

    def host_env(self) -> dict[str, str]:
        return host_env(self.settings, self.environ)

    def renew(self, client: Client) -> tuple[list[int], list[str]]:
        """Issue credentials to each live instance of ours that has none, or whose credentials have less
        than RENEW_SHARE of their lifetime left. Answers the instances served and the errors (one line
        each; the other instances are served all the same)."""
        if self.issuer is None:
            return [], []
        issuer = self.issuer
        due = client.call(
            "select * from gpuq.instance_credentials_due(%s, %s, make_interval(secs => %s))",
            (issuer.kind, self.settings.label_prefix, issuer.lifetime_s * RENEW_SHARE),
        )
        issued: list[int] = []
        errors: list[str] = []
        for row in due:
            instance_id = int(row["instance_id"])
            try:
                scope = scope_for(self.settings, row["queues"], self.environ)
                values, expires_at = issuer.issue(instance_id, scope)
                if client.set_instance_credentials(instance_id, issuer.kind, values, expires_at):
                    issued.append(instance_id)
                    log.info(
                        "instance %s: %s credentials issued until %s", instance_id, issuer.kind, expires_at
                    )
                else:
                    log.info(
                        "instance %s ended meanwhile: its %s credentials were not stored",
                        instance_id,
                        issuer.kind,
                    )
            except (CredentialsRefused, SettingError, GpuqError) as e:
                errors.append(f"{issuer.kind} credentials for instance {instance_id}: {e}")
                log.warning("%s", errors[-1])
        return issued, errors


def host_env(ms: ManagerSettings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a rented host is started with so that its worker uses its instance's credentials (nothing
    secret: which credentials to use, and Supabase's public project address)."""
    kind = _issued_kind(ms, environ)
    if kind is None:
        return {}
    env = {"GPUQ_STORAGE_CREDENTIALS": "instance"}
    if kind == "supabase" and environ.get("SUPABASE_URL"):
        env["SUPABASE_URL"] = environ["SUPABASE_URL"]
    return env


def _issued_kind(ms: ManagerSettings, environ: Mapping[str, str]) -> str | None:
    """ "s3" with GPUQ_S3_ROLE_ARN, "supabase" with SUPABASE_JWT_SECRET and supabase:// storage, else None."""
    if (environ.get(ROLE_ARN) or "").strip():
        return "s3"
    if environ.get(JWT_SECRET) and urlsplit(ms.storage_url or "").scheme == "supabase":
        return "supabase"
    return None


def _issuer(ms: ManagerSettings, environ: Mapping[str, str]) -> Issuer | None:
    role_arn = (environ.get(ROLE_ARN) or "").strip()
    jwt_secret = environ.get(JWT_SECRET) or ""
    raw_lifetime = (environ.get(LIFETIME) or "").strip()
    try:
        lifetime = int(raw_lifetime) if raw_lifetime else DEFAULT_LIFETIME_S
    except ValueError:
        raise SettingError(f"{LIFETIME} must be a whole number of seconds, got {raw_lifetime!r}") from None
    scheme = urlsplit(ms.storage_url or "").scheme
    wants = _issued_kind(ms, environ)
    if wants is None:
        return None
    if scheme != wants:
        raise SettingError(
            f"{ROLE_ARN} issues S3 keys, but GPUQ_STORAGE_URL is not s3://… (got {scheme or 'none'})"
        )
    assert ms.storage_url is not None
    _storage_location(ms.storage_url)  # a bucket and prefix a policy can hold
    if not MIN_LIFETIME_S <= lifetime <= MAX_LIFETIME_S:
        raise SettingError(
            f"{LIFETIME} must be between {MIN_LIFETIME_S} and {MAX_LIFETIME_S}, got {lifetime}"
        )
    if lifetime * RENEW_SHARE < 2 * ms.tick_seconds:
        raise SettingError(
            f"{LIFETIME}={lifetime} leaves too little time to renew them: at least 4 ticks "
            f"(GPUQ_MANAGER_TICK_SECONDS={ms.tick_seconds:g})"
        )
    _check_no_long_lived_keys(ms, wants)
    if wants == "s3":
        return StsIssuer(role_arn, lifetime, ms.label_prefix)
    apikey = next((environ[n] for n in ANON_KEYS if environ.get(n)), "")
    if not apikey:
        raise SettingError(
            f"{JWT_SECRET} issues Supabase Storage tokens; hosts also need the project's public key as "
            "apiKey: set SUPABASE_ANON_KEY (or SUPABASE_PUBLISHABLE_KEY)"
        )
    if why := secret_in(apikey, environ):
        raise SettingError(
            f"SUPABASE_ANON_KEY carries {why}: hosts get only the public anon or publishable key"
        )
    if len(jwt_secret) < 32:
        raise SettingError(f"{JWT_SECRET} is shorter than Supabase's (at least 32 characters)")
    if not environ.get("SUPABASE_URL"):
        raise SettingError(f"{JWT_SECRET} issues Supabase Storage tokens; set SUPABASE_URL too")
    return SupabaseTokenIssuer(jwt_secret, apikey, lifetime, ms.label_prefix)


def _check_no_long_lived_keys(ms: ManagerSettings, kind: str) -> None:
    """With instance credentials, rented hosts get no long-lived storage key at all, even one of their own."""
    names = AWS_KEYS if kind == "s3" else SUPABASE_KEYS
    why = f"rented hosts get instance credentials of their own ({ROLE_ARN if kind == 's3' else JWT_SECRET})"
    for name in names:
        if name in ms.worker_env_names:
            raise SettingError(f"GPUQ_WORKER_ENV names {name}, but {why}: remove it")
    for queue, launch in ms.launch.items():
        for name in names:
            if launch.provider != "local" and name in launch.env:
                raise SettingError(f"queues.{queue}.env sets {name}, but {why}: remove it")
