"""A local stand-in for Supabase Storage's object REST API, for supabase-py's storage client (storage3).

Held to the real server (github.com/supabase/storage, src/http/routes/object/*, src/http/error-handler.ts,
src/internal/errors/codes.ts), not to what gpuq sends:

- Routes, under /storage/v1: POST and PUT /object/{bucket}/{path} (multipart upload; POST honours
  x-upsert), GET /object/{bucket}/{path} and /object/authenticated/..., GET /object/public/...,
  POST /object/sign/{bucket}/{path} -> {"signedURL": "/object/sign/...?token=JWT"},
  GET /object/sign/{bucket}/{path}?token=..., GET /object/info/{bucket}/{path} (and info/authenticated,
  info/public), DELETE /object/{bucket} {"prefixes": [...]}.
- Auth: the storage server checks `Authorization: Bearer <JWT>` itself (src/internal/auth/jwt.ts: jose's
  jwtVerify, HS256 with the project's JWT secret: signature, algorithm and expiry, refused as
  AccessDenied with jose's message); the gateway in front of it does not require the apikey header on
  storage routes (supabase/docker/volumes/api/kong.yml). A service_role JWT bypasses row-level security.
- Row-level security, two ways. Without a database: Supabase's default for a project with no storage
  policies, deny-all: any role but service_role sees private buckets' objects as not found and has its
  uploads refused. With `db_url` (a Postgres database of the test's own): the stand-in keeps the rows of
  a storage.objects table there (the columns Supabase's has, RLS on, Supabase's grants and its auth.jwt())
  and runs each request's statements as the real server does (src/internal/database/postgres/scope.ts,
  src/storage/database/pg.ts, src/storage/uploader.ts): in a transaction with `role` set to the token's
  role and `request.jwt.claims` to its claims, an upload's INSERT (upsert: INSERT … ON CONFLICT DO UPDATE)
  … RETURNING * tried and rolled back before the write, a read's SELECT of the row. So the policies a test
  installs (`run_sql`, e.g. sql/supabase/storage_policies.sql as shipped) decide, as Postgres evaluates
  them; a refused write is AccessDenied "new row violates row-level security policy" (42501), a row
  the policies hide is NoSuchKey.
- Errors: as the real error handler renders them, HTTP 400 for every non-500 error, with the meaningful
  status as a string in the body: {"statusCode": "404", "code": "NoSuchKey", "error": "not_found",
  "message": "Object not found"}. Unknown routes get a real 404.
- Faults: `fail_next(status, count)` answers the next requests with a gateway-style plain-text error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

PREFIX = "/storage/v1"
_PREFIXED = {("GET", "public"), ("GET", "sign"), ("POST", "sign"), ("GET", "authenticated"), ("GET", "info")}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(payload: dict[str, Any], secret: str) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(sig)}"


def verify_jwt(token: str, secret: str) -> dict[str, Any]:
    """The payload of a valid, unexpired HS256 JWT; ValueError with jose's message otherwise."""
    try:
        header, body, sig = token.split(".")
        alg = json.loads(_b64url_decode(header)).get("alg")
    except ValueError:
        raise ValueError("Invalid Compact JWS") from None
    if alg != "HS256":  # the storage server's configured algorithm (JWT_ALGORITHM, default HS256)
        raise ValueError('"alg" (Algorithm) Header Parameter value not allowed')
    expected = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64url_decode(sig)):
        raise ValueError("signature verification failed")
    payload = json.loads(_b64url_decode(body))
    if "exp" in payload and payload["exp"] < time.time():
        raise ValueError('"exp" claim timestamp check failed')
    return payload


class StorageError(Exception):
    """A renderable error of the real server: `status` goes in the body, HTTP status is 400 or 500."""

    def __init__(self, status: int, code: str, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.error = status, code, message, error or code

    def body(self) -> dict[str, str]:
        status = str(self.status)
        return {"statusCode": status, "code": self.code, "error": self.error, "message": self.message}


def no_such_key() -> StorageError:
    return StorageError(404, "NoSuchKey", "Object not found", "not_found")


def no_such_bucket() -> StorageError:
    return StorageError(404, "NoSuchBucket", "Bucket not found", "Bucket not found")


def access_denied(message: str) -> StorageError:
    return StorageError(403, "AccessDenied", message, "Unauthorized")


@dataclass
class StoredObject:
    data: bytes
    mimetype: str
    cache_control: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    version: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data).hexdigest()}"'


# What the stand-in keeps in a test's database with db_url: the parts of Supabase's storage and auth schemas
# that policies read (supabase/storage migrations; supabase/postgres's auth.jwt()), with Supabase's grants.
_SCHEMA = """
create schema if not exists storage;
create schema if not exists auth;
create table if not exists storage.buckets (
    id text primary key, name text not null, public boolean not null default false, owner_id text);
create table if not exists storage.objects (
    id uuid primary key default gen_random_uuid(),
    bucket_id text references storage.buckets (id),
    name text collate "C" not null,
    owner uuid, owner_id text, metadata jsonb, user_metadata jsonb, version text,
    created_at timestamptz default now(), updated_at timestamptz default now(),
    last_accessed_at timestamptz default now(),
    unique (bucket_id, name));
alter table storage.buckets enable row level security;
alter table storage.objects enable row level security;
create or replace function auth.jwt() returns jsonb language sql stable as $$
    select coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), ''))::jsonb $$;
create or replace function auth.uid() returns uuid language sql stable as $$
    select coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid $$;
create or replace function auth.role() returns text language sql stable as $$
    select coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'))::text $$;
create or replace function storage.foldername(name text) returns text[] language plpgsql immutable as $$
declare _parts text[];
begin
    select string_to_array(name, '/') into _parts;
    return _parts[1:array_length(_parts, 1) - 1];
end $$;
grant usage on schema storage, auth to anon, authenticated, service_role;
grant all on storage.buckets, storage.objects to anon, authenticated, service_role;
"""
# Roles are the server's, not one database's: made once, by whichever test run comes first.
_ROLES = ("anon", "authenticated", "service_role", "authenticator")


def _uuid_or_none(value: object) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


class Rls:
    """Row-level security on storage.objects, decided in Postgres under the token's role and claims."""

    def __init__(self, db_url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        with psycopg.connect(db_url, autocommit=True) as conn:
            for role in _ROLES:
                # there already, or made by another test run at this very moment
                with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                    conn.execute(f"create role {role} nologin")
            conn.execute(_SCHEMA)
        self.conn = psycopg.connect(db_url)
        self.lock = threading.Lock()

    def run_sql(self, sql: str) -> None:
        """Run SQL as the project's owner would in the SQL editor (e.g. a policies file)."""
        with self.lock:
            self.conn.execute(sql.encode())
            self.conn.commit()

    def create_bucket(self, name: str, public: bool) -> None:
        with self.lock:
            self.conn.execute(
                "insert into storage.buckets (id, name, public) values (%s, %s, %s) "
                "on conflict (id) do update set public = excluded.public",
                (name, name, public),
            )
            self.conn.commit()

    def _scoped(self, claims: dict[str, Any]) -> None:
        """As the server scopes a request's transaction: its role and claims, local to the transaction."""
        self.conn.execute(
            "select set_config('role', %s, true), set_config('request.jwt.claim.role', %s, true), "
            "set_config('request.jwt.claim.sub', %s, true), set_config('request.jwt.claims', %s, true)",
            (
                str(claims.get("role", "anon")),
                str(claims.get("role", "anon")),
                str(claims.get("sub", "")),
                json.dumps(claims),
            ),
        )

    def may_upload(self, bucket: str, name: str, claims: dict[str, Any], *, upsert: bool) -> None:
        """The permission test before an upload: the row written under the token's role, then rolled back.
        Raises StorageError as the server renders the database's refusal."""
        if claims.get("role") == "service_role":
            return
        owner = claims.get("sub")
        sql = (
            "insert into storage.objects (bucket_id, name, owner, owner_id, version) "
            "values (%s, %s, %s, %s, '1')"
            + (
                " on conflict (name, bucket_id) do update set version = excluded.version, "
                "owner = excluded.owner, owner_id = excluded.owner_id"
                if upsert
                else ""
            )
            + " returning *"
        )
        pg = self._psycopg
        with self.lock:
            try:
                self._scoped(claims)
                self.conn.execute(sql, (bucket, name, _uuid_or_none(owner), owner))
            except pg.errors.InsufficientPrivilege as e:
                message = (
                    "new row violates row-level security policy" if "row-level security" in str(e) else str(e)
                )
                raise access_denied(message) from None
            except pg.errors.UniqueViolation:
                raise StorageError(
                    409, "KeyAlreadyExists", "The resource already exists", "Duplicate"
                ) from None
            except pg.Error as e:  # the server's fallback for any other database error
                raise StorageError(500, "DatabaseError", f"database error, code: {e.sqlstate}") from None
            finally:
                self.conn.rollback()

    def record(self, bucket: str, name: str, claims: dict[str, Any]) -> None:
        """The write itself, as the server makes it after the test: as the owner, past RLS."""
        owner = claims.get("sub")
        with self.lock:
            self.conn.execute(
                "insert into storage.objects (bucket_id, name, owner, owner_id, version) "
                "values (%s, %s, %s, %s, '1') on conflict (name, bucket_id) do update "
                "set updated_at = now(), owner = excluded.owner, owner_id = excluded.owner_id",
                (bucket, name, _uuid_or_none(owner), owner),
            )
            self.conn.commit()

    def visible(self, bucket: str, name: str, claims: dict[str, Any]) -> bool:
        """Whether the token's role sees the object's row (findObject under the request's scope)."""
        if claims.get("role") == "service_role":
            return True
        with self.lock:
            try:
                self._scoped(claims)
                row = self.conn.execute(
                    "select id from storage.objects where name = %s and bucket_id = %s limit 1",
                    (name, bucket),
                ).fetchone()
            except self._psycopg.Error as e:
                raise StorageError(500, "DatabaseError", f"database error, code: {e.sqlstate}") from None
            finally:
                self.conn.rollback()
        return row is not None

    def forget(self, bucket: str, name: str) -> None:
        with self.lock:
            self.conn.execute(
                "delete from storage.objects where bucket_id = %s and name = %s", (bucket, name)
            )
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()


class SupabaseStorageStandIn:
    """Start with `with SupabaseStorageStandIn() as s:`; `s.url` is the project URL for create_client.
    With `db_url`, row-level security is decided by the policies in that database (see the module's doc)."""

    def __init__(self, db_url: str | None = None) -> None:
        self.rls = Rls(db_url) if db_url else None
        self.jwt_secret = secrets.token_hex(32)
        self.service_role_key = sign_jwt({"iss": "supabase", "role": "service_role"}, self.jwt_secret)
        self.anon_key = sign_jwt({"iss": "supabase", "role": "anon"}, self.jwt_secret)
        self.buckets: dict[str, bool] = {}  # name -> public
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.lock = threading.Lock()
        self._faults: list[int] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def create_bucket(self, name: str, *, public: bool = False) -> None:
        self.buckets[name] = public
        if self.rls is not None:
            self.rls.create_bucket(name, public)

    def sign(self, claims: dict[str, Any]) -> str:
        """A JWT signed with the project's secret, as the project's own keys are."""
        return sign_jwt(claims, self.jwt_secret)

    def fail_next(self, status: int, count: int = 1) -> None:
        with self.lock:
            self._faults.extend([status] * count)

    def start(self) -> None:
        standin = self

        class Handler(_Handler):
            store = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.rls is not None:
            self.rls.close()

    @property
    def url(self) -> str:
        assert self._server is not None, "call start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> SupabaseStorageStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def take_fault(self) -> int | None:
        with self.lock:
            return self._faults.pop(0) if self._faults else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: SupabaseStorageStandIn

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # -- plumbing

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json; charset=utf-8"})

    def _claims(self, required: bool) -> dict[str, Any] | None:
        """The JWT's claims (role defaults to anon); None when unauthenticated and `required` is false
        (allowInvalidJwt routes)."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        try:
            claims = verify_jwt(token, self.store.jwt_secret)
        except ValueError as e:
            if required:
                raise access_denied(str(e)) from None
            return None
        return {**claims, "role": str(claims.get("role", "anon"))}

    def _find(self, bucket: str, name: str, claims: dict[str, Any] | None) -> StoredObject:
        public = self.store.buckets.get(bucket)
        if public is None or (claims is None and not public):
            raise no_such_bucket()
        obj = self.store.objects.get((bucket, name))
        if obj is None or (not public and not self._visible(bucket, name, claims or {})):
            raise no_such_key()  # a row RLS hides is not there
        return obj

    def _visible(self, bucket: str, name: str, claims: dict[str, Any]) -> bool:
        if self.store.rls is None:  # Supabase's default, deny-all: only service_role sees private objects
            return claims.get("role") == "service_role"
        return self.store.rls.visible(bucket, name, claims)

    def _send_object(self, obj: StoredObject, extra: dict[str, str] | None = None) -> None:
        headers = {
            "Content-Type": obj.mimetype,
            "Cache-Control": obj.cache_control,
            "ETag": obj.etag,
            "Last-Modified": format_datetime(obj.updated_at, usegmt=True),
            "Accept-Ranges": "bytes",
            **(extra or {}),
        }
        self._send(200, obj.data, headers)

    # -- dispatch

    def _dispatch(self) -> None:
        fault = self.store.take_fault()
        if fault is not None:
            self._read_body()
            self._send(fault, b"upstream connect error", {"Content-Type": "text/plain"})
            return
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        route = path[len(PREFIX) :].split("/") if path.startswith(PREFIX + "/object/") else []
        route = [unquote(p) for p in route[2:]]  # after "", "object"
        try:
            handled = self._route(self.command, route, query)
        except StorageError as e:
            self._json(500 if e.status == 500 else 400, e.body())
            return
        if not handled:
            self._read_body()
            self._json(
                404,
                {
                    "statusCode": "404",
                    "error": "Not Found",
                    "message": f"Route {self.command}:{self.path} not found",
                    "code": "InvalidRequest",
                },
            )

    def _route(self, method: str, route: list[str], query: dict[str, str]) -> bool:
        """Serve one request; False for routes the stand-in does not know (or the server lacks)."""
        if route and route[0] in ("list", "list-v2", "move", "copy", "upload"):
            return False  # real routes this stand-in does not implement
        if method == "DELETE" and len(route) == 1:
            self._delete(route[0])
            return True
        kind = ""
        # Prefixed routes exist only for some methods; POST /object/public/x uploads to bucket "public".
        if route and (method, route[0]) in _PREFIXED:
            kind, route = route[0], route[1:]
            if kind == "info" and route and route[0] in ("public", "authenticated"):
                kind, route = f"info/{route[0]}", route[1:]
        if len(route) < 2:
            return False
        bucket, name = route[0], "/".join(route[1:])
        match (method, kind):
            case ("POST" | "PUT", ""):
                upsert = method == "PUT" or self.headers.get("x-upsert") == "true"
                self._upload(bucket, name, upsert=upsert)
            case ("GET", "" | "authenticated"):
                # /object/{bucket}/... allows a missing or invalid JWT (public buckets only then)
                self._send_object(self._find(bucket, name, self._claims(required=kind == "authenticated")))
            case ("GET", "public"):
                self._send_object(self._public(bucket, name))
            case ("POST", "sign"):
                self._sign(bucket, name)
            case ("GET", "sign"):
                self._get_signed(bucket, name, query.get("token", ""))
            case ("GET", "info" | "info/authenticated"):
                claims = self._claims(required=kind == "info/authenticated")
                self._info(bucket, name, self._find(bucket, name, claims))
            case ("GET", "info/public"):
                self._info(bucket, name, self._public(bucket, name))
            case _:
                return False
        return True

    def _public(self, bucket: str, name: str) -> StoredObject:
        if not self.store.buckets.get(bucket):
            raise no_such_bucket()
        obj = self.store.objects.get((bucket, name))
        if obj is None:
            raise no_such_key()
        return obj

    # -- operations

    def _upload(self, bucket: str, name: str, *, upsert: bool) -> None:
        claims = self._claims(required=True)
        assert claims is not None
        body = self._read_body()
        content_type = self.headers.get("Content-Type", "")
        cache_control = "no-cache"
        if content_type.startswith("multipart/form-data"):
            raw = f"Content-Type: {content_type}\r\n\r\n".encode() + body
            message = BytesParser(policy=HTTP).parsebytes(raw)
            fields: dict[str, str] = {}
            data, mimetype = b"", "application/octet-stream"
            for part in message.iter_parts():
                field_name = part.get_param("name", header="content-disposition")
                if part.get_filename() is not None:
                    data = part.get_payload(decode=True) or b""
                    mimetype = part.get_content_type()
                elif field_name:
                    fields[str(field_name)] = (part.get_payload(decode=True) or b"").decode()
            mimetype = fields.get("contentType") or mimetype
            if fields.get("cacheControl"):
                cache_control = f"max-age={fields['cacheControl']}"
        else:
            data, mimetype = body, content_type or "application/octet-stream"
            if self.headers.get("Cache-Control"):
                cache_control = self.headers["Cache-Control"]
        if bucket not in self.store.buckets:
            raise no_such_bucket()
        rls = self.store.rls
        if rls is not None:
            rls.may_upload(bucket, name, claims, upsert=upsert)
        elif claims["role"] != "service_role":
            raise access_denied("new row violates row-level security policy")
        with self.store.lock:
            existing = self.store.objects.get((bucket, name))
            if existing is not None and not upsert:
                raise StorageError(409, "KeyAlreadyExists", "The resource already exists", "Duplicate")
            obj = StoredObject(data, mimetype, cache_control)
            if existing is not None:
                obj.id, obj.created_at = existing.id, existing.created_at
            self.store.objects[(bucket, name)] = obj
            if rls is not None:
                rls.record(bucket, name, claims)
        self._json(200, {"Id": obj.id, "Key": f"{bucket}/{name}"})

    def _sign(self, bucket: str, name: str) -> None:
        claims = self._claims(required=True)
        request = json.loads(self._read_body() or b"{}")
        try:
            expires_in = int(request["expiresIn"])
        except (KeyError, TypeError, ValueError):
            message = "body must have required property 'expiresIn'"
            raise StorageError(400, "InvalidRequest", message) from None
        if expires_in < 1:
            raise StorageError(400, "InvalidRequest", "body/expiresIn must be >= 1")
        self._find(bucket, name, claims)
        now = int(time.time())
        token = sign_jwt(
            {"url": f"{bucket}/{name}", "scope": "download", "iat": now, "exp": now + expires_in},
            self.store.jwt_secret,
        )
        self._json(200, {"signedURL": f"/object/sign/{bucket}/{name}?token={token}"})

    def _get_signed(self, bucket: str, name: str, token: str) -> None:
        if not token:
            raise StorageError(400, "InvalidRequest", "querystring must have required property 'token'")
        try:
            payload = verify_jwt(token, self.store.jwt_secret)
        except ValueError as e:
            if "exp" in str(e):
                raise StorageError(400, "ExpiredToken", "The provided token has expired.") from None
            raise StorageError(400, "InvalidJWT", str(e)) from None
        if payload.get("scope") != "download":
            raise StorageError(400, "InvalidSignature", "Token is not scoped for download")
        if payload.get("url") != f"{bucket}/{name}":
            raise StorageError(400, "InvalidSignature", "Invalid signature")
        obj = self.store.objects.get((bucket, name))
        if obj is None:
            raise no_such_key()
        expires = datetime.fromtimestamp(payload["exp"], UTC)
        self._send_object(obj, {"Expires": format_datetime(expires, usegmt=True)})

    def _info(self, bucket: str, name: str, obj: StoredObject) -> None:
        self._json(
            200,
            {
                "id": obj.id,
                "name": name,
                "version": obj.version,
                "bucket_id": bucket,
                "size": len(obj.data),
                "content_type": obj.mimetype,
                "cache_control": obj.cache_control,
                "etag": obj.etag,
                "metadata": None,
                "last_modified": obj.updated_at.isoformat(),
                "created_at": obj.created_at.isoformat(),
            },
        )

    def _delete(self, bucket: str) -> None:
        claims = self._claims(required=True)
        assert claims is not None
        prefixes = json.loads(self._read_body() or b"{}").get("prefixes", [])
        if bucket not in self.store.buckets:
            raise no_such_bucket()
        deleted = []
        # Only service_role deletes here (no policy a test installs lets any other role delete).
        if claims["role"] == "service_role":
            with self.store.lock:
                for name in prefixes:
                    obj = self.store.objects.pop((bucket, name), None)
                    if obj is not None:
                        deleted.append({"name": name, "bucket_id": bucket, "id": obj.id})
                        if self.store.rls is not None:
                            self.store.rls.forget(bucket, name)
        self._json(200, deleted)

    do_GET = _dispatch
    do_POST = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch
