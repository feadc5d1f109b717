"""Each instance's own storage credentials in the database (sql 0008): set by the manager for live instances
only, read by that instance's worker alone, gone the moment the instance ends. Attacks are made as a host
would make them: logged in as a real member of gpuq_worker, holding its own instance's secret."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from gpuq.client import Client, InstanceClient, InvalidRequest, IssuedCredentials, JobNotFound, NotAuthorized
from gpuq.settings import Settings
from tests.conftest import enroll

LABEL = "gpuq:test:q"
KEYS = {"access_key_id": "ASIAEXAMPLE", "secret_access_key": "s3cr3t-of-instance", "session_token": "tok"}


@pytest.fixture
def host(worker_login: str, settings: Settings, client: Client) -> Iterator[Client]:
    """A connection as the worker login (client: the owner's, which acts as the manager)."""
    c = Client.connect(worker_login, settings)
    yield c
    c.close()


def labelled(client: Client, queues: tuple[str, ...] = ("q",)) -> InstanceClient:
    """An instance of this deployment, as a rent records one: our label, a secret."""
    instance_id, secret = client.enroll(queues, label=LABEL)
    return client.as_instance(secret, instance_id)


def soon(seconds: float = 3600) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def stored(client: Client) -> list[tuple[int, str]]:
    rows = client.call("select instance_id, kind from gpuq.instance_credentials order by 1, 2")
    return [(r["instance_id"], r["kind"]) for r in rows]


def due(client: Client, kind: str = "s3", within: float = 1800, prefix: str = "gpuq:test:") -> list[int]:
    rows = client.call(
        "select * from gpuq.instance_credentials_due(%s, %s, make_interval(secs => %s))",
        (kind, prefix, within),
    )
    return [r["instance_id"] for r in rows]


def test_an_instance_reads_its_own_credentials_and_no_other(client: Client, host: Client) -> None:
    a, b = labelled(client), labelled(client)
    assert a.instance_id is not None and b.instance_id is not None
    expires = soon()
    assert client.set_instance_credentials(a.instance_id, "s3", KEYS, expires)
    got = host.as_instance(a.secret).credentials("s3")
    assert got is not None
    assert (got.kind, got.values, got.expires_at) == ("s3", KEYS, expires)
    assert host.as_instance(a.secret).credentials("supabase") is None
    # b's secret answers b's credentials: none. No argument names another instance.
    assert host.as_instance(b.secret).credentials("s3") is None
    assert host.call("select * from gpuq.instance_credentials(%s)", (b.secret,)) == []
    for guess in (None, "", "x" * 15, "gpuqi_" + "A" * 43, a.secret + " "):
        with pytest.raises(NotAuthorized):
            host.call("select * from gpuq.instance_credentials(%s)", (guess,))


def test_a_host_cannot_set_list_or_read_credentials_directly(client: Client, host: Client) -> None:
    a, b = labelled(client), labelled(client)
    assert a.instance_id is not None and b.instance_id is not None
    client.set_instance_credentials(b.instance_id, "s3", KEYS, soon())
    attacks = [
        ("select gpuq.set_instance_credentials(%s, 's3', '{}', now() + interval '1 hour')", (a.instance_id,)),
        ("select * from gpuq.instance_credentials_due('s3', '', interval '1 day')", ()),
        ("select * from gpuq.instance_credentials", ()),
        ("update gpuq.instance_credentials set instance_id = %s", (a.instance_id,)),
        ("delete from gpuq.instance_credentials", ()),
    ]
    for sql, args in attacks:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            host.call(sql, args)
        host.conn.rollback()
    assert stored(client) == [(b.instance_id, "s3")]


def test_credentials_are_stored_for_live_instances_only(client: Client) -> None:
    live, ended = labelled(client), labelled(client)
    assert live.instance_id is not None and ended.instance_id is not None
    ended.deregister("gone")
    assert not client.set_instance_credentials(ended.instance_id, "s3", KEYS, soon())
    revoked = labelled(client)
    assert revoked.instance_id is not None
    client.call("select gpuq.revoke_instance(%s)", (revoked.instance_id,))
    assert not client.set_instance_credentials(revoked.instance_id, "s3", KEYS, soon())
    assert stored(client) == []
    assert client.set_instance_credentials(live.instance_id, "s3", KEYS, soon())
    with pytest.raises(JobNotFound, match="instance 999999 does not exist"):
        client.set_instance_credentials(999999, "s3", KEYS, soon())


@pytest.mark.parametrize(
    "end",
    [
        "select gpuq.record_destroy(%s, 'idle')",
        "select gpuq.mark_lost(%s)",
        "select gpuq.mark_failed(%s, 'destroy not confirmed')",
        "select gpuq.revoke_instance(%s)",
    ],
)
def test_an_instance_that_ends_loses_its_credentials_at_once(client: Client, end: str) -> None:
    inst, other = labelled(client), labelled(client)
    assert inst.instance_id is not None and other.instance_id is not None
    for i in (inst, other):
        assert i.instance_id is not None
        client.set_instance_credentials(i.instance_id, "s3", KEYS, soon())
        client.set_instance_credentials(i.instance_id, "supabase", {"token": "t", "apikey": "a"}, soon())
    client.call(end, (inst.instance_id,))
    assert stored(client) == [(other.instance_id, "s3"), (other.instance_id, "supabase")]
    assert inst.instance_id not in due(client)  # and never renewed
    assert not client.set_instance_credentials(inst.instance_id, "s3", KEYS, soon())


def test_a_deregistered_worker_loses_its_credentials(client: Client) -> None:
    inst = labelled(client)
    assert inst.instance_id is not None
    client.set_instance_credentials(inst.instance_id, "s3", KEYS, soon())
    inst.deregister("exiting")
    assert stored(client) == []


def test_a_rotated_secret_keeps_the_credentials(client: Client, host: Client) -> None:
    """The worker replaces the manager's secret at registration: its instance keeps its credentials."""
    from gpuq.client import new_secret, secret_hash

    inst = labelled(client)
    assert inst.instance_id is not None
    client.set_instance_credentials(inst.instance_id, "s3", KEYS, soon())
    fresh = new_secret()
    host.as_instance(inst.secret).register(new_secret_hash=secret_hash(fresh))
    assert host.as_instance(fresh).credentials("s3") is not None
    with pytest.raises(NotAuthorized):
        host.as_instance(inst.secret).credentials("s3")  # the boot secret is dead, and reads nothing


def test_expired_credentials_are_not_answered(client: Client) -> None:
    inst = labelled(client)
    assert inst.instance_id is not None
    client.set_instance_credentials(inst.instance_id, "s3", KEYS, soon(3600))
    client.conn.execute(  # an hour later
        "update gpuq.instance_credentials set issued_at = issued_at - interval '1 hour', "
        "expires_at = expires_at - interval '1 hour 1 second'"
    )
    assert inst.credentials("s3") is None


def test_due_lists_live_instances_of_ours_missing_or_near_expiry(client: Client) -> None:
    fresh, near, missing = labelled(client), labelled(client), labelled(client)
    ended = labelled(client)
    foreign_id, _ = client.enroll(["q"], label="gpuq:other-deployment:q")
    unlabelled = enroll(client)
    for i in (fresh, near, missing, ended):
        assert i.instance_id is not None
    assert fresh.instance_id and near.instance_id and missing.instance_id and ended.instance_id
    client.set_instance_credentials(fresh.instance_id, "s3", KEYS, soon(3600))
    client.set_instance_credentials(near.instance_id, "s3", KEYS, soon(600))
    client.set_instance_credentials(near.instance_id, "supabase", {"token": "t"}, soon(3600))
    ended.deregister("gone")
    assert due(client, "s3", within=1800) == [near.instance_id, missing.instance_id]
    assert due(client, "supabase", within=1800) == [fresh.instance_id, missing.instance_id]
    assert foreign_id not in due(client, prefix="gpuq:test:")
    assert unlabelled.instance_id not in due(client, prefix="")


def test_bad_credentials_are_refused_clearly(client: Client) -> None:
    inst = labelled(client)
    assert inst.instance_id is not None
    with pytest.raises(InvalidRequest, match="credentials must expire in the future"):
        client.set_instance_credentials(
            inst.instance_id, "s3", KEYS, datetime.now(UTC) - timedelta(seconds=1)
        )
    with pytest.raises(InvalidRequest, match="kind_must_be_s3_or_supabase"):
        client.set_instance_credentials(inst.instance_id, "gcs", KEYS, soon())
    with pytest.raises(InvalidRequest, match="credentials_must_be_at_most_16_kib"):
        noise = secrets.token_urlsafe(20000)  # incompressible, so over 16 KiB as stored
        client.set_instance_credentials(inst.instance_id, "s3", {"x": noise}, soon())
    with pytest.raises(InvalidRequest, match="credentials_must_be_a_json_object"):
        client.call(
            "select gpuq.set_instance_credentials(%s, 's3', '[1]', now() + interval '1 hour')",
            (inst.instance_id,),
        )
    assert stored(client) == []


def test_issued_credentials_never_show_their_values() -> None:
    issued = IssuedCredentials("s3", KEYS, datetime.now(UTC), soon())
    assert "s3cr3t" not in repr(issued) and "s3cr3t" not in str(issued)
