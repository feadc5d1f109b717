"""One odd thing must not stop the manager's money duty: an odd price or row at a provider, one provider
failing in an unexpected way, a dropped database connection, two managers through a transaction pooler.

Against real Postgres, the real `vastai` SDK and the Vast stand-in, boto3 against moto.
"""

# The fixtures are test_tick's, imported by name, so the test parameters "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from gpuq.client import Client
from gpuq.settings import Settings
from manager.cli import _loop
from manager.metrics import Metrics
from manager.providers.aws_spot import AwsSpotProvider
from manager.providers.base import OfferFilter
from manager.providers.vast import VastProvider
from manager.tick import Manager, tick
from tests.conftest import make_settings
from tests.manager.test_aws_spot import ami, aws, ec2  # noqa: F401  (fixtures)
from tests.manager.test_aws_spot import spec as aws_spec
from tests.manager.test_reconcile import PREFIX, rent_behind_our_back, rent_by_tick, status_of
from tests.manager.test_tick import (  # noqa: F401  (fixtures)
    db,
    enqueue,
    env,
    host,
    manager,
    our_live,
    rows,
    settings_for,
)
from tests.standins.vast_server import VastStandin
from tests.test_pooler import pooled_url  # noqa: F401  (fixture)


def rent_two(db: Client, vast: VastProvider, standin: VastStandin) -> list[tuple[int, int]]:
    """Two rents the manager made and recorded, each with its worker registered: (row id, Vast id)."""
    standin.add_offer()
    standin.add_offer()
    enqueue(db, 4)
    rented = tick(manager(db, vast)).rented
    assert len(rented) == 2
    pids = sorted(int(r.split(":", 1)[1]) for r in rented)
    return [(host(db, standin, p).instance_id or 0, p) for p in pids]


def orphan(vast: VastProvider, standin: VastStandin) -> int:
    standin.add_offer()
    return int(rent_behind_our_back(vast, vast.search_offers(OfferFilter())[0]))


# ----------------------------------------------------------------------------------- odd prices


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("dph", [-0.5, 1e9])
def test_a_price_the_database_refuses_does_not_stop_a_dead_instance_being_destroyed(
    db: Client, vast: VastProvider, standin: VastStandin, dph: float
) -> None:
    (_, odd_pid), (dead_iid, dead_pid) = rent_two(db, vast, standin)
    standin.row_overrides[odd_pid] = {"dph_total": dph}
    standin.set_status(dead_pid, "exited")

    tick(manager(db, vast))

    assert dead_pid not in standin.live()
    assert status_of(db, dead_iid)["terminated_at"] is not None


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("dph", [-0.5, 1e9])
def test_an_orphan_with_a_price_the_database_refuses_is_still_destroyed(
    db: Client, vast: VastProvider, standin: VastStandin, dph: float
) -> None:
    pid = orphan(vast, standin)
    standin.row_overrides[pid] = {"dph_total": dph}

    tick(manager(db, vast))

    assert pid not in standin.live()


@pytest.mark.usefixtures("env")
def test_an_orphan_priced_nan_does_not_switch_off_the_daily_budget(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    # Python's json writes NaN for a float nan, and requests reads it back.
    pid = orphan(vast, standin)
    standin.row_overrides[pid] = {"dph_total": float("nan")}
    tick(manager(db, vast))
    assert pid not in standin.live()

    # A budget already spent: no rent may follow, whatever the queue.
    ms = settings_for(daily_budget=0.01)
    standin.add_offer()
    enqueue(db, 4)
    result = tick(manager(db, vast, ms))
    assert result.rented == [], result.lines
    assert our_live(standin) == {}


@pytest.mark.usefixtures("env")
def test_an_offer_priced_nan_is_not_rented_past_the_caps(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer(dph_base=float("nan"))
    enqueue(db, 4)
    result = tick(manager(db, vast, settings_for(max_total_dph=0.1)))
    assert result.rented == [], result.lines
    assert our_live(standin) == {}


# ----------------------------------------------------------------------------------- odd rows


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(
    "field,value", [("start_date", 1e20), ("label", 7), ("status_msg", 7), ("gpu_name", 4090)]
)
def test_one_odd_listing_row_does_not_stop_reconciliation(
    db: Client, vast: VastProvider, standin: VastStandin, field: str, value: object
) -> None:
    odd = orphan(vast, standin)
    standin.row_overrides[odd] = {field: value}
    dead_iid, dead_pid = rent_by_tick(db, vast, standin)
    dead_pid = int(dead_pid)
    standin.set_status(dead_pid, "exited")

    tick(manager(db, vast))

    assert dead_pid not in standin.live()
    assert status_of(db, dead_iid)["terminated_at"] is not None
    if field == "start_date":  # still ours by its label: an orphan, destroyed
        assert odd not in standin.live()


# ----------------------------------------------------------------------------------- one provider


@pytest.mark.usefixtures("env")
def test_a_vast_listing_that_breaks_off_does_not_stop_aws_reconciliation(
    db: Client, vast: VastProvider, standin: VastStandin, aws: AwsSpotProvider
) -> None:
    aws_orphan = aws.create(aws.search_offers(OfferFilter())[0], aws_spec(label=PREFIX + "tts"))
    standin.broken_lists = 100  # every try of this tick

    m = manager(db, vast)
    m.providers = {"vast": vast, "aws_spot": aws}
    result = tick(m)

    assert any(e.startswith("vast:") for e in result.reconcile.errors), result.reconcile.errors
    assert result.reconcile.orphans_destroyed == [f"aws_spot:{aws_orphan}"]
    assert aws_orphan not in {p.provider_id for p in aws.list_instances(PREFIX) if p.status != "gone"}


# ----------------------------------------------------------------------------------- the database


@pytest.mark.usefixtures("env")
def test_the_run_loop_reconnects_after_the_database_connection_drops(
    db: Client, vast: VastProvider, standin: VastStandin, db_url: str, settings: Settings
) -> None:
    own = Client.connect(db_url, settings)
    m = manager(own, vast, dataclasses.replace(settings_for(), tick_seconds=0.01))
    standin.add_offer()
    enqueue(db, 2)
    # A server restart, a failover, a network blip: the manager's session ends under it.
    db.call("select pg_terminate_backend(%s)", (own.conn.info.backend_pid,))

    _loop(m, dry_run=False, ticks=3)

    assert len(our_live(standin)) == 1  # a later tick did its work
    m.client.close()


@pytest.mark.usefixtures("env")
def test_two_managers_through_a_transaction_pooler_never_tick_at_once(
    db: Client, vast: VastProvider, standin: VastStandin, pooled_url: str, tmp_path: Path
) -> None:
    pooled = make_settings(pooled_url, tmp_path, transaction_pooler=True)
    first, second = Client.connect(pooled_url, pooled), Client.connect(pooled_url, pooled)
    standin.hold_lists = threading.Event()  # the first tick stops in its listing, holding the lock
    ticking = threading.Thread(target=tick, args=(manager(first, vast),))
    ticking.start()
    deadline = time.monotonic() + 10
    while not standin.of_kind("list"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        result = tick(Manager(second, settings_for(), {}, Metrics()))  # nothing to wait for if it runs
    finally:
        standin.hold_lists.set()
        ticking.join(30)
    assert result.skipped
    # and once the first is done, the lock is free again
    assert not tick(Manager(second, settings_for(), {}, Metrics())).skipped
    first.close()
    second.close()


@pytest.mark.usefixtures("env")
def test_the_tick_lock_outlives_an_idle_in_transaction_timeout(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    # Some databases end a transaction left idle this long; the lock's transaction is idle for the whole
    # tick (a slow provider), and losing it would let a second manager tick at the same time.
    dbname = db.conn.info.dbname
    db.call(f"alter database {dbname} set idle_in_transaction_session_timeout = '300ms'")
    standin.hold_lists = threading.Event()
    first = Client.connect(db.url, db.settings)
    ticking = threading.Thread(target=tick, args=(manager(first, vast),))
    try:
        ticking.start()
        deadline = time.monotonic() + 10
        while not standin.of_kind("list"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # well past the timeout, the first tick still in its listing
        other = Client.connect(db.url, db.settings)
        try:
            assert tick(Manager(other, settings_for(), {}, Metrics())).skipped
        finally:
            other.close()
    finally:
        standin.hold_lists.set()
        ticking.join(30)
        first.close()
        db.call(f"alter database {dbname} reset idle_in_transaction_session_timeout")
