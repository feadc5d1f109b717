"""A rented host is a stranger: attacks by a host holding instance A's worker login and secret, against
instance B and its jobs, and against the queue. Each must be refused (or clamped) and change nothing.

Every attacker here logs in as a real login role that is a member of gpuq_worker, as a host would, and
holds what a host can read: the shared worker login and its own instance's secret."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from gpuq.client import (
    Client,
    InstanceClient,
    InvalidRequest,
    Job,
    NotAuthorized,
    NotHeld,
    new_secret,
    secret_hash,
)
from gpuq.migrate import load_migrations, migrate
from gpuq.settings import Settings
from tests.conftest import ADMIN_URL, create_database, drop_database, enroll


@pytest.fixture
def host_conn(worker_login: str, settings: Settings, client: Client) -> Iterator[Client]:
    """A connection as the worker login (client: the owner's, for setting up and checking)."""
    c = Client.connect(worker_login, settings)
    yield c
    c.close()


def as_host(conn: Client, inst: InstanceClient) -> InstanceClient:
    """What a host holds: the worker login and its own instance's secret."""
    return conn.as_instance(inst.secret, inst.instance_id)


def tok(job: Job) -> uuid.UUID:
    assert job.lease_token is not None
    return job.lease_token


def snapshot(client: Client) -> list[dict[str, object]]:
    return client.call(
        "select id, status, attempt, instance_id, lease_token, lease_expires_at, progress, progress_message,"
        " result, error_code, finished_at, run_after from gpuq.jobs order by id"
    )


def instance_row(client: Client, instance_id: int | None) -> dict[str, object]:
    return client.call(
        "select status, queues, gpu_name, vram_mb, max_concurrency, provider, label, secret_sha256"
        " from gpuq.instances where id = %s",
        (instance_id,),
    )[0]


@pytest.fixture
def victim(client: Client) -> tuple[InstanceClient, list[Job]]:
    """Instance B, honest, holding three running jobs."""
    b = enroll(client, ("q",), concurrency=3)
    for _ in range(3):
        client.enqueue("q", {"secret": "B's customer data"})
    return b, b.claim(["q"], 3)


def test_reports_on_another_instances_jobs_are_refused_and_change_nothing(
    client: Client, host_conn: Client, victim: tuple[InstanceClient, list[Job]]
) -> None:
    _, jobs = victim
    attacker = as_host(host_conn, enroll(client, ("q",)))
    before = snapshot(client)
    for job in jobs:
        # the guessable fence of old (job id, attempt 1..3) is no token at all; a guessed token, and even
        # B's real token (leaked, say) from A's instance, are refused alike
        for guess in (uuid.UUID(int=job.attempt), uuid.uuid4(), tok(job)):
            with pytest.raises(NotHeld):
                attacker.complete(job.id, guess, {"outputs": [{"url": "https://evil.example/x.png"}]})
            with pytest.raises(NotHeld):
                attacker.fail(job.id, guess, "INPUT_INVALID", "failed for good", retryable=False)
            with pytest.raises(NotHeld):
                attacker.progress(job.id, guess, 99, "99% - re-enter your card at https://evil.example")
        assert attacker.release([(job.id, tok(job))]) == 0
    assert attacker.complete_many([(j.id, tok(j), {"forged": True}) for j in jobs]) == [j.id for j in jobs]
    reply = attacker.heartbeat([(j.id, tok(j)) for j in jobs], lease_seconds=600)
    assert sorted(reply.lost) == sorted((j.id, tok(j)) for j in jobs)
    assert snapshot(client) == before


def test_a_refusal_says_nothing_about_the_job(
    client: Client, host_conn: Client, victim: tuple[InstanceClient, list[Job]]
) -> None:
    b, jobs = victim
    attacker = as_host(host_conn, enroll(client, ("q",)))
    b.complete(jobs[0].id, tok(jobs[0]))  # one finished, one running elsewhere, one that does not exist
    messages = set()
    for job_id in (jobs[0].id, jobs[1].id, 10**9):
        with pytest.raises(NotHeld) as refused:
            attacker.complete(job_id, uuid.uuid4())
        messages.add(str(refused.value).replace(str(job_id), "N"))
    assert messages == {"job N is not held by this instance under that lease token"}


def test_claim_is_held_to_the_instances_capacity_queues_vram_and_lease_bounds(
    client: Client, host_conn: Client
) -> None:
    client.conn.execute("update gpuq.config set min_lease_seconds = 10, max_lease_seconds = 600")
    a = as_host(host_conn, enroll(client, ("q",), concurrency=2, vram_mb=8000))
    for _ in range(20):
        client.enqueue("q", {})
    big = client.enqueue("q", {}, min_vram_mb=48000, priority=100)
    other = client.enqueue("other-customer", {"private": True}, priority=100)

    jobs = a.claim(["q", "other-customer"], 2**31 - 1, lease_seconds=2**31 - 1)
    assert len(jobs) == 2 and {j.queue for j in jobs} == {"q"} and big not in {j.id for j in jobs}
    now = datetime.now(UTC)
    for job in jobs:
        assert job.lease_expires_at is not None and job.lease_expires_at <= now + timedelta(seconds=601)
    assert a.claim(None, 100) == []  # no capacity left
    assert client.get(other).status == "queued" and client.get(big).status == "queued"

    with pytest.raises(InvalidRequest, match="a lease must be at least 1 second"):
        a.claim(["q"], 1, lease_seconds=-5)
    with pytest.raises(InvalidRequest, match="a lease must be at least 1 second"):
        a.heartbeat([(j.id, tok(j)) for j in jobs], lease_seconds=-1)
    a.heartbeat([(j.id, tok(j)) for j in jobs], lease_seconds=1)  # clamped up to the floor, not expired
    for job in jobs:
        lease = client.get(job.id).lease_expires_at
        assert lease is not None and lease >= datetime.now(UTC) + timedelta(seconds=9)


def test_a_worker_cannot_raise_its_own_vram_or_capacity_by_registering(
    client: Client, host_conn: Client
) -> None:
    inst = enroll(client, ("q",), concurrency=1, vram_mb=8000, gpu_name="RTX 3060")
    a = as_host(host_conn, inst)
    reg = a.register(gpu_name="H100", vram_mb=80000, gpu_count=8)
    assert (reg.vram_mb, reg.max_concurrency, reg.queues) == (8000, 1, ("q",))
    row = instance_row(client, inst.instance_id)
    assert (row["gpu_name"], row["vram_mb"], row["max_concurrency"]) == ("RTX 3060", 8000, 1)
    needs_big = client.enqueue("q", {}, min_vram_mb=40000)
    assert a.claim(None, 1) == []
    assert client.get(needs_big).status == "queued"
    # lowering is allowed: a host whose GPU has less than the offer said claims less
    assert a.register(vram_mb=4000).vram_mb == 4000
    client.enqueue("q", {}, min_vram_mb=6000)
    assert a.claim(None, 1) == []


def test_instance_functions_act_on_the_callers_instance_only(
    client: Client, host_conn: Client, victim: tuple[InstanceClient, list[Job]]
) -> None:
    b, _ = victim
    b_row = instance_row(client, b.instance_id)
    attacker = as_host(host_conn, enroll(client, ("q",)))
    attacker.request_drain("draining someone else?")
    attacker.register(gpu_name="x", vram_mb=1)
    assert attacker.deregister("gone") == 0
    assert instance_row(client, b.instance_id) == b_row  # B untouched: still busy with its jobs
    assert [j.status for j in client.list_jobs()] == ["running"] * 3
    # the manager's functions that take an instance id are not the worker's
    for sql, args in (
        ("select gpuq.drain_instance(%s, 'x')", (b.instance_id,)),
        ("select gpuq.release_instance_jobs(%s)", (b.instance_id,)),
        ("select gpuq.mark_failed(%s, 'x')", (b.instance_id,)),
        ("select gpuq.record_destroy(%s, 'x')", (b.instance_id,)),
        ("select gpuq.revoke_instance(%s)", (b.instance_id,)),
        ("select gpuq.enroll_instance(%s, '{q}', 4096, 100000)", (secret_hash(new_secret()),)),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            host_conn.call(sql, args)


def test_an_ended_instances_secret_claims_nothing(client: Client, host_conn: Client) -> None:
    client.enqueue("q", {})
    enrolled = enroll(client, ("q",))
    ended = [enroll(client, ("q",)) for _ in range(4)]
    assert ended[0].instance_id and ended[1].instance_id and ended[2].instance_id
    client.call("select gpuq.record_destroy(%s, 'destroyed')", (ended[0].instance_id,))
    client.call("select gpuq.mark_lost(%s)", (ended[1].instance_id,))
    client.call("select gpuq.mark_failed(%s, 'never ready')", (ended[2].instance_id,))
    ended[3].deregister("exited")
    for inst in ended:
        host = as_host(host_conn, inst)
        for call in (
            lambda h=host: h.claim(None, 1),
            lambda h=host: h.heartbeat(),
            lambda h=host: h.register(),
            lambda h=host: h.complete(1, uuid.uuid4()),
            lambda h=host: h.manager_silence_seconds(),
        ):
            with pytest.raises(NotAuthorized, match="unknown, expired or revoked"):
                call()
    assert client.list_jobs()[0].status == "queued"
    assert len(as_host(host_conn, enrolled).claim(None, 1)) == 1  # a live one still works


def test_an_expired_enrolment_and_a_revoked_instance_claim_nothing(client: Client, host_conn: Client) -> None:
    client.enqueue("q", {})
    _, secret = client.enroll(["q"], valid_for_seconds=0.5)
    host = host_conn.as_instance(secret)
    host.heartbeat()
    time.sleep(0.7)
    with pytest.raises(NotAuthorized):
        host.claim(None, 1)
    revoked = enroll(client, ("q",))
    [job] = as_host(host_conn, revoked).claim(None, 1)
    assert client.call("select gpuq.revoke_instance(%s) as n", (revoked.instance_id,))[0]["n"] == 1
    assert client.get(job.id).status == "queued"
    with pytest.raises(NotAuthorized):
        as_host(host_conn, revoked).claim(None, 1)


def test_the_secret_a_host_was_started_with_is_dead_once_its_worker_registers(
    client: Client, host_conn: Client
) -> None:
    boot = enroll(client, ("q",))
    fresh = new_secret()
    as_host(host_conn, boot).register(new_secret_hash=secret_hash(fresh))
    with pytest.raises(NotAuthorized):
        as_host(host_conn, boot).claim(None, 1)  # e.g. read later from EC2 user data or `docker inspect`
    assert host_conn.as_instance(fresh).claim(None, 1) == []
    with pytest.raises(InvalidRequest, match="32-byte sha256"):
        host_conn.as_instance(fresh).register(new_secret_hash=b"short")


def test_secrets_of_other_shapes_are_refused(host_conn: Client, client: Client) -> None:
    enroll(client, ("q",))
    for secret in ("", "x", "gpuqi_" + "A" * 5000, "' or true --"):
        with pytest.raises(NotAuthorized):
            host_conn.as_instance(secret).claim(None, 1)


def test_session_settings_do_not_change_the_backoff(client: Client, host_conn: Client) -> None:
    a = as_host(host_conn, enroll(client, ("q",)))
    job_id = client.enqueue("q", {}, max_attempts=3)
    [job] = a.claim(None, 1)
    host_conn.conn.execute("set gpuq.retry_base_seconds = '1e9'")
    host_conn.conn.execute("set gpuq.retry_max_seconds = '1e12'")
    assert a.fail(job_id, tok(job), "GPU_OOM", "oom") == "queued"
    wait = client.get(job_id).run_after - datetime.now(UTC)
    assert wait <= timedelta(seconds=10)  # gpuq.config's 10 s base, not the session's 1e9


def test_sizes_are_capped(client: Client, host_conn: Client) -> None:
    with pytest.raises(InvalidRequest, match="payload_must_be_at_most_1_mib"):
        client.enqueue("q", {"blob": "x" * (1024 * 1024 + 1)})
    a = as_host(host_conn, enroll(client, ("q",)))
    client.enqueue("q", {})
    client.enqueue("q", {})
    [one, two] = a.claim(None, 2)
    with pytest.raises(InvalidRequest, match="over 64 KiB"):
        a.complete(one.id, tok(one), {"outputs": "x" * (8 * 1024 * 1024)})
    assert client.get(one.id).status == "running"
    a.progress(one.id, tok(one), 10, "m" * 100_000)
    assert len(client.get(one.id).progress_message or "") == 500
    a.heartbeat([(one.id, tok(one)), (two.id, tok(two))], {"junk": "x" * (16 * 1024 * 1024)})
    metrics = client.call("select metrics from gpuq.instances where id = %s", (a.instance_id,))[0]["metrics"]
    assert metrics == {}  # an oversized report is dropped, the heartbeat is not
    assert (
        a.fail(one.id, tok(one), "BACKEND_ERROR", "e" * 100_000, details={"tb": "t" * 8_000_000}) == "queued"
    )
    [event] = client.history(one.id)
    assert len(event["message"]) == 2000 and event["details"]["truncated"] is True
    with pytest.raises(InvalidRequest, match="at most 4096 jobs"):
        a.heartbeat([(i, uuid.uuid4()) for i in range(5000)])


def test_the_server_ends_a_cancelled_or_timed_out_job_whoever_holds_it(
    client: Client, host_conn: Client
) -> None:
    """A host that never stops a job cannot keep it: leases stop at the timeout (plus a grace) and at a
    cancel (plus a grace), and the claim path ends the job."""
    client.conn.execute("update gpuq.config set cancel_grace_seconds = 1, timeout_grace_seconds = 1")
    stubborn = as_host(host_conn, enroll(client, ("q",)))
    cancelled = client.enqueue("q", {}, timeout_seconds=3600)
    timed_out = client.enqueue("q", {}, timeout_seconds=1, max_attempts=1)
    jobs = stubborn.claim(None, 2, lease_seconds=600)
    assert client.cancel(cancelled) == "running"
    time.sleep(2.3)
    stubborn.heartbeat([(j.id, tok(j)) for j in jobs], lease_seconds=600)  # extends neither past its cap
    time.sleep(0.2)
    enroll(client, ("q",)).claim(None, 1)  # any claim reaps
    assert (client.get(cancelled).status, client.get(cancelled).error_code) == ("cancelled", "CANCELLED")
    assert (client.get(timed_out).status, client.get(timed_out).error_code) == ("failed", "TIMEOUT")


def test_a_job_held_but_not_named_by_the_heartbeat_goes_back_at_once(
    client: Client, host_conn: Client
) -> None:
    """A claim whose reply was lost (a worker killed between claim and reply, a restart) leaves a job the
    instance holds and its worker does not know: the next heartbeat, which names only what the worker
    knows, hands it back instead of keeping it running for nobody."""
    a = as_host(host_conn, enroll(client, ("q",)))
    known, lost = client.enqueue("q", {}), client.enqueue("q", {})
    jobs = {j.id: j for j in a.claim(None, 2)}
    a.heartbeat([(known, tok(jobs[known]))])
    assert client.get(known).status == "running"
    back = client.get(lost)
    assert (back.status, back.error_code, back.lease_token) == ("queued", "LEASE_EXPIRED", None)
    with pytest.raises(NotHeld):
        a.complete(lost, tok(jobs[lost]))


def test_nothing_in_gpuq_is_open_to_public_anon_or_authenticated_even_after_supabases_grants() -> None:
    """Supabase's documented recipe for exposing a custom schema grants everything in it to anon and
    authenticated, now and (default privileges) for what is created later. Applied between migrations
    and after them, `gpuq migrate` leaves nothing executable or readable by PUBLIC, anon, authenticated."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        for role in ("anon", "authenticated", "service_role"):
            conn.execute(
                f"do $$ begin create role {role} nologin; exception when duplicate_object then null; end $$"
            )
    url = create_database("gpuq_supabase")
    recipe = """
        grant usage on schema gpuq to anon, authenticated, service_role;
        grant all on all tables in schema gpuq to anon, authenticated, service_role;
        grant all on all routines in schema gpuq to anon, authenticated, service_role;
        grant all on all sequences in schema gpuq to anon, authenticated, service_role;
        alter default privileges in schema gpuq grant all on tables to anon, authenticated, service_role;
        alter default privileges in schema gpuq grant all on routines to anon, authenticated, service_role;
        alter default privileges in schema gpuq grant all on sequences to anon, authenticated, service_role;
    """
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            from psycopg.rows import dict_row

            conn.row_factory = dict_row  # type: ignore[assignment]
            migrations = load_migrations()
            migrate(conn, migrations[:5])  # an older gpuq, exposed by the recipe, then upgraded
            conn.execute(recipe)
            migrate(conn, migrations)
            assert exposed(conn) == []
            conn.execute(recipe)  # exposed again after the upgrade: the next migrate repairs it
            assert exposed(conn) != []  # (the check can fail)
            migrate(conn, migrations)
            assert exposed(conn) == []
    finally:
        drop_database(url)


def exposed(conn: psycopg.Connection) -> list[str]:  # type: ignore[type-arg]
    """Every function, table or sequence in schema gpuq that PUBLIC, anon or authenticated may use."""
    rows = conn.execute(
        """
        select format('%s %s to %s', kind, name, grantee) as what from (
            select 'function' as kind, p.oid::regprocedure::text as name, r.rolname as grantee
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace,
                   (select 'public' as rolname union select rolname from pg_roles
                     where rolname in ('anon', 'authenticated')) r
             where n.nspname = 'gpuq'
               and has_function_privilege(r.rolname, p.oid, 'execute')
            union all
            select 'table', c.oid::regclass::text, r.rolname
              from pg_class c join pg_namespace n on n.oid = c.relnamespace,
                   (select 'public' as rolname union select rolname from pg_roles
                     where rolname in ('anon', 'authenticated')) r
             where n.nspname = 'gpuq' and c.relkind in ('r', 'S', 'v')
               and (has_table_privilege(r.rolname, c.oid, 'select, insert, update, delete, truncate')
                    or (c.relkind = 'S' and has_sequence_privilege(r.rolname, c.oid, 'usage')))
        ) as x order by 1
        """
    ).fetchall()
    return [r["what"] if isinstance(r, dict) else r[0] for r in rows]


def test_the_worker_login_may_run_exactly_the_worker_functions(client: Client, worker_login: str) -> None:
    role = psycopg.conninfo.conninfo_to_dict(worker_login)["user"]
    rows = client.call(
        """select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
            where n.nspname = 'gpuq' and has_function_privilege(%s, p.oid, 'execute') order by 1""",
        (role,),
    )
    assert [r["proname"] for r in rows] == sorted(
        [
            "claim_jobs",
            "complete_job",
            "complete_jobs",
            "deregister_instance",
            "fail_job",
            "heartbeat",
            "instance_credentials",
            "manager_silence_seconds",
            "register_instance",
            "release_jobs",
            "report_progress",
            "request_drain",
        ]
    )


def test_every_worker_function_refuses_a_caller_without_a_live_secret(
    client: Client, host_conn: Client, victim: tuple[InstanceClient, list[Job]]
) -> None:
    """The list above, each called with no secret, a guessed one, and a dead one: GQ401 every time."""
    _, jobs = victim
    dead = enroll(client, ("q",))
    dead.deregister("gone")
    job = jobs[0]
    calls = {
        "claim_jobs": ("select * from gpuq.claim_jobs(%s, '{q}', 10, 60)", ()),
        "complete_job": ("select gpuq.complete_job(%s, %s, %s)", (job.id, tok(job))),
        "complete_jobs": ("select * from gpuq.complete_jobs(%s, %s, %s::uuid[])", ([job.id], [tok(job)])),
        "deregister_instance": ("select gpuq.deregister_instance(%s)", ()),
        "fail_job": ("select gpuq.fail_job(%s, %s, %s, 'GPU_OOM', 'x')", (job.id, tok(job))),
        "heartbeat": ("select * from gpuq.heartbeat(%s, %s, %s::uuid[])", ([job.id], [tok(job)])),
        "instance_credentials": ("select * from gpuq.instance_credentials(%s)", ()),
        "manager_silence_seconds": ("select gpuq.manager_silence_seconds(%s)", ()),
        "register_instance": ("select * from gpuq.register_instance(%s)", ()),
        "release_jobs": ("select gpuq.release_jobs(%s, %s, %s::uuid[])", ([job.id], [tok(job)])),
        "report_progress": ("select gpuq.report_progress(%s, %s, %s, 1)", (job.id, tok(job))),
        "request_drain": ("select gpuq.request_drain(%s)", ()),
    }
    before = snapshot(client)
    for name, (sql, args) in calls.items():
        for secret in (None, new_secret(), dead.secret):
            with pytest.raises(NotAuthorized):
                host_conn.call(sql, (secret, *args))
            assert snapshot(client) == before, name


def test_migrations_revoke_their_own_functions_from_public(empty_migrated: str) -> None:
    """Without gpuq migrate's sweep: each migration's own revokes leave nothing to PUBLIC."""
    with psycopg.connect(empty_migrated, autocommit=True) as conn:
        assert exposed(conn) == []


@pytest.fixture
def empty_migrated() -> Iterator[str]:
    url = create_database("gpuq_own_revokes")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create schema gpuq")
        for m in load_migrations():
            conn.execute(m.sql.encode())  # what each file does by itself, no sweep after
    yield url
    drop_database(url)
