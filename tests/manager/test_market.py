"""The manager in a hostile market (issue 16): prices it can trust, machines it stops renting again, the
caps shared between queues. Whole ticks against real Postgres and the real `vastai` SDK talking to the Vast
stand-in, each with the fault it needs; money is read from the stand-in's own bill.
"""

# The fixtures are test_tick's, imported by name, so the test parameters "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from gpuq.client import Client
from manager.config import ManagerSettings, from_dict
from manager.policy import AvoidMachine, Hold, Rent
from manager.providers.base import LaunchSpec, OfferFilter, ProviderError
from manager.providers.vast import VastProvider
from manager.tick import tick
from tests.manager.conftest import VAST_KEY
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
from tests.standins.vast_server import RUNNING_AT_S, SimClock, VastStandin

STORAGE_60GB = 0.15 * 60 / 720  # the launch's 60 GB at the stand-in's default $0.15/GB-month


def rentals_on(standin: VastStandin, machine: int) -> list[Any]:
    return [r for r in standin.rentals.values() if r.machine_id == machine]


def booked(db: Client) -> dict[str, float]:
    return {
        r["provider_instance_id"]: float(r["dph"])
        for r in rows(db, "select provider_instance_id, dph from gpuq.instances")
    }


def creates_of(standin: VastStandin, offer_id: int) -> int:
    return sum(1 for r in standin.of_kind("create") if r.path.rstrip("/").endswith(f"/{offer_id}"))


# ------------------------------------------------------------------------------- 1. bid prices


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("reading", ["on-demand", "min_bid", "min_bid+storage"])
def test_a_bid_is_booked_at_what_it_bills_whatever_a_bid_search_says_dph_total_is(
    db: Client, vast: VastProvider, standin: VastStandin, reading: str
) -> None:
    # The A6000: storage read as dph_total - dph_base went negative when a bid search answered
    # dph_total at the minimum bid, and the bid was booked far below its bill.
    standin.bid_dph_total = reading
    standin.add_offer(gpu_name="RTX 4090", dph_base=0.36, min_bid=0.30, storage_cost=0.15)
    enqueue(db, 1)
    m = manager(db, vast)

    assert tick(m).rented
    (rental,) = standin.rentals.values()
    assert (rental.rent_type, rental.price) == ("bid", pytest.approx(0.33))
    assert rental.dph_total == pytest.approx(0.33 + STORAGE_60GB)
    (price,) = booked(db).values()
    assert rental.dph_total <= price <= rental.dph_total + 1e-5  # booked at the bill, never below
    assert not tick(m).reconcile.price_changes  # the listing agrees with the books


@pytest.mark.usefixtures("env")
def test_no_rent_above_the_per_instance_cap_when_bid_searches_answer_the_minimum_bid(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.bid_dph_total = "min_bid"
    fits = standin.add_offer(dph_base=0.50, min_bid=0.26)  # 0.286 + 0.0125 = $0.2985/h
    over = standin.add_offer(dph_base=0.50, min_bid=0.27)  # 0.297 + 0.0125 = $0.3095/h: over $0.30
    enqueue(db, 4)
    ms = settings_for(queues={"tryon": _queue(max_dph=0.30)})
    m = manager(db, vast, ms)
    for _ in range(3):
        tick(m)
    assert [r.offer_id for r in standin.rentals.values()] == [fits]
    assert creates_of(standin, over) == 0
    assert all(r.dph_total <= 0.30 for r in standin.rentals.values())


def test_storage_is_the_dearest_believable_reading_and_an_unpriceable_bid_is_skipped(
    vast: VastProvider, standin: VastStandin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    f = OfferFilter(min_disk_gb=72)
    dearer = standin.add_offer(
        min_bid=0.20, storage_cost=0.10
    )  # storage_cost reading: 0.10 x 72 / 720 = 0.01
    standin.search_overrides[dearer] = {"search": {"diskHour": 0.03}}  # the breakdown says more: believed
    odd = standin.add_offer(min_bid=0.20, storage_cost=0.10)
    standin.search_overrides[odd] = {"search": {"diskHour": -0.4}}  # negative: not a price
    huge = standin.add_offer(min_bid=0.20, storage_cost=0.10)
    standin.search_overrides[huge] = {"search": {"diskHour": 500.0}}  # $/month misread as $/h: not believed
    unpriceable = standin.add_offer(min_bid=0.20)
    standin.search_overrides[unpriceable] = {"storage_cost": None, "search": {}}  # no storage reading at all
    standin.add_offer(dph_base=0.30, min_bid=0.35)  # bidding would cost more than renting
    no_min_bid = standin.add_offer()
    standin.search_overrides[no_min_bid] = {"min_bid": None}

    offers = {o.offer_id: o for o in vast.search_offers(f)}

    assert set(offers) == {str(dearer), str(odd), str(huge)}
    assert offers[str(dearer)].storage_dph == pytest.approx(0.03)
    assert offers[str(dearer)].dph == pytest.approx(0.22 + 0.03)
    for oid in (odd, huge):
        assert offers[str(oid)].storage_dph == pytest.approx(0.01)
        assert offers[str(oid)].dph == pytest.approx(0.22 + 0.01)
    for o in offers.values():
        assert o.dph > 0 and o.bid is not None and o.dph >= o.bid
    assert "storage readings disagree or are not believable" in caplog.text


def test_on_demand_prices_take_the_dearest_reading(vast: VastProvider, standin: VastStandin) -> None:
    plain = standin.add_offer(dph_base=0.40, storage_cost=0.15)
    low_total = standin.add_offer(dph_base=0.40, storage_cost=0.15)
    standin.search_overrides[low_total] = {"dph_total": 0.05}  # below dph_base + storage: not believed
    offers = {o.offer_id: o for o in vast.search_offers(OfferFilter(interruptible=False, min_disk_gb=60))}
    assert offers[str(plain)].dph == pytest.approx(0.40 + STORAGE_60GB)
    assert offers[str(low_total)].dph == pytest.approx(0.40 + STORAGE_60GB)
    assert offers[str(plain)].storage_dph == pytest.approx(STORAGE_60GB)


# ------------------------------------------------------------------------------- 2. no negative price


@pytest.mark.usefixtures("env")
def test_an_offer_priced_below_zero_is_never_rented_and_the_ticks_go_on(
    db: Client, vast: VastProvider, standin: VastStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the old reading made of a bid search answering dph_total 0.05 over a dph_base of 0.36: a bid
    # of 0.055 plus a storage of -0.31. It was rented, then refused by the books
    # (dph_must_not_be_negative): rent, crash, orphan, destroy, on every tick.
    standin.add_offer(dph_base=0.36, min_bid=0.05)
    enqueue(db, 1)
    real = vast.search_offers
    monkeypatch.setattr(
        vast, "search_offers", lambda f: [dataclasses.replace(o, dph=-0.255) for o in real(f)]
    )
    m = manager(db, vast)
    for _ in range(3):
        tick(m)  # no tick fails
    assert standin.of_kind("create") == []
    assert rows(db, "select * from gpuq.instances") == []


def test_the_provider_refuses_to_rent_at_a_price_the_books_would_refuse(
    vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    offer = vast.search_offers(OfferFilter())[0]
    spec = LaunchSpec("gpuq:test:tryon", "img", 60, "true", bid_price=offer.bid)
    for dph in (-0.2, float("nan"), float("inf")):
        with pytest.raises(ProviderError, match="no usable price"):
            vast.create(dataclasses.replace(offer, dph=dph), spec)
    with pytest.raises(ProviderError, match="not a usable price"):
        vast.create(offer, dataclasses.replace(spec, bid_price=-0.1))
    assert standin.of_kind("create") == []


@pytest.mark.usefixtures("env")
def test_the_hostile_reading_that_made_prices_negative_now_books_the_bill(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.bid_dph_total = "min_bid"
    standin.add_offer(dph_base=0.36, min_bid=0.05)
    enqueue(db, 1)
    m = manager(db, vast)
    result = tick(m)
    assert result.rented and not result.errors
    (rental,) = standin.rentals.values()
    (price,) = booked(db).values()
    assert price == pytest.approx(rental.dph_total, abs=1e-5) and price > 0
    assert not tick(m).errors


# ------------------------------------------------------------------------------- 3. rent-then-shed


@pytest.mark.usefixtures("env")
def test_a_machine_billing_more_than_its_offer_is_priced_at_its_bill_and_not_rented_again(
    db: Client, vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    # On-demand: a bid billing that far above bid + storage is taken for a silent on-demand rent and
    # destroyed at once (test_vast); an on-demand price can differ from its offer unnoticed until listed.
    lying = standin.add_offer(dph_base=0.20, machine_id=101)  # offered at 0.20 + storage...
    standin.machine_surcharge[101] = 0.20  # ...bills 0.20 more
    standin.add_offer(dph_base=0.30, machine_id=102)
    enqueue(db, 4)  # two instances wanted
    on_demand = {"tryon": _queue(interruptible=False)}
    # shed_avoid_s=0: the markup alone must stop the loop
    m = manager(db, vast, settings_for(max_total_dph=0.6, shed_avoid_s=0, queues=on_demand))

    tick(m)  # rents both: 0.2125 + 0.3125 as offered
    assert len(standin.rentals) == 2
    shed = tick(m)  # the listing shows 0.4125: over the cap, the caps shed it
    assert any("price machine 101's offers $0.2000/h higher" in line for line in shed.reconcile.lines)
    assert [r for r in rentals_on(standin, 101) if r.destroyed_at is None] == []
    for _ in range(4):  # and it is not rented again at its offer's price (it was, 15 times in 13 minutes)
        clock.advance(61)  # searches refresh: its offer is listed again
        tick(m)
        assert standin.committed_rate() <= 0.6
    assert len(rentals_on(standin, 101)) == 1

    # Where the caps allow its real price it may be rented, booked at what it bills.
    m.settings = settings_for(max_total_dph=1.0, shed_avoid_s=0, queues=on_demand)
    tick(m)
    again = [r for r in rentals_on(standin, 101) if r.destroyed_at is None]
    assert len(again) == 1 and again[0].offer_id == lying
    assert booked(db)[str(again[0].id)] == pytest.approx(again[0].dph_total, abs=1e-5)
    assert not tick(m).reconcile.price_changes


# ------------------------------------------------------------------------------- 4. broken machines


@pytest.mark.usefixtures("env")
def test_a_machine_whose_instance_exited_is_avoided_and_its_job_keeps_its_attempts(
    db: Client, vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    standin.add_offer(min_bid=0.20, machine_id=201)  # the cheapest, and its instances exit
    standin.exit_after[201] = 30
    standin.add_offer(min_bid=0.25, machine_id=202)
    (job_id,) = enqueue(db, 1)
    m = manager(db, vast)
    (rented,) = tick(m).rented
    pid = rented.split(":", 1)[1]
    clock.advance(RUNNING_AT_S + 1)
    assert len(host(db, standin, pid).claim(["tryon"], limit=1)) == 1
    clock.advance(40)  # it exited; by now its worker's lease has passed too
    db.conn.execute(
        "update gpuq.jobs set lease_expires_at = now() - interval '1 second' where id = %s", (job_id,)
    )

    for _ in range(4):
        tick(m)

    assert len(rentals_on(standin, 201)) == 1  # rented once (the issue: 10 times)
    assert [r.destroyed_at is None for r in rentals_on(standin, 202)] == [True]
    (avoided,) = rows(db, "select machine_id, until - at as span, reason from gpuq.avoided_machines")
    assert avoided["machine_id"] == "201" and avoided["span"].days == 7 and "exited" in avoided["reason"]
    # Released by reconciliation before its lease could be reaped: the death used no attempt.
    (after,) = rows(db, "select status, attempt - releases as used from gpuq.jobs where id = %s", job_id)
    assert after["used"] == 0


@pytest.mark.usefixtures("env")
def test_a_stuck_instance_shed_by_the_caps_before_its_ready_timeout_is_not_rented_again(
    db: Client, vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    standin.add_offer(min_bid=0.20, machine_id=301)  # the cheapest, and it never finishes loading
    standin.stuck_machines.add(301)
    standin.add_offer(min_bid=0.25, machine_id=302)
    enqueue(db, 1)
    m = manager(db, vast, settings_for(max_total_dph=0.5))
    tick(m)
    clock.advance(120)
    m.settings = settings_for(max_total_dph=0.1)  # the caps shed it while it boots
    shed = tick(m)
    avoids = [(a.machine_id, a.for_s) for a in shed.actions if isinstance(a, AvoidMachine)]
    assert avoids == [("301", 3600.0)]
    m.settings = settings_for(max_total_dph=0.5)
    for _ in range(3):
        tick(m)
    assert len(rentals_on(standin, 301)) == 1  # the issue: 7 times
    assert [r.destroyed_at is None for r in rentals_on(standin, 302)] == [True]
    (avoided,) = rows(db, "select machine_id, until - at as span from gpuq.avoided_machines")
    assert avoided["machine_id"] == "301" and avoided["span"].total_seconds() == pytest.approx(3600, abs=1)


@pytest.mark.usefixtures("env")
def test_a_vanished_offer_and_a_stale_minimum_bid_are_tried_once(
    db: Client, vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    phantom = standin.add_offer(min_bid=0.10, machine_id=401)  # the index lists it; it is gone
    standin.phantom_offers.add(phantom)
    stale = standin.add_offer(min_bid=0.12, machine_id=402)  # its real minimum is 0.20
    standin.stale_min_bid[stale] = 0.20
    good = standin.add_offer(min_bid=0.20, machine_id=403)
    enqueue(db, 1)
    m = manager(db, vast)

    first, second, third = tick(m), tick(m), tick(m)
    assert "no_such_ask" in " ".join(first.errors)
    assert "invalid_price" in " ".join(second.errors)
    assert third.rented and [r.offer_id for r in our_live(standin).values()] == [good]
    # The stale offer's error carried a new_contract: destroyed in that same call, nothing left billing.
    (leftover,) = [r for r in standin.rentals.values() if r.offer_id == stale]
    assert leftover.destroyed_at is not None

    # After the search refreshes (the index lists both again), and from a fresh process (cron):
    db.conn.execute("delete from gpuq.jobs")
    enqueue(db, 4)
    clock.advance(120)
    fresh = VastProvider(VAST_KEY, server_url=standin.url, clock=clock.now, sleep=clock.sleep)
    for provider in (vast, fresh, vast):
        tick(manager(db, provider))
    assert (creates_of(standin, phantom), creates_of(standin, stale)) == (1, 1)  # the issue: 6 times each
    spans = {r["machine_id"] for r in rows(db, "select machine_id from gpuq.avoided_machines")}
    assert {"401", "402"} <= spans


# ------------------------------------------------------------------------------- 5. sharing the caps


def two_queues(**top: Any) -> ManagerSettings:
    raw = {
        "daily_budget": 50.0,
        "max_total_dph": 0.8,
        "queues": {
            "bid": {
                "provider": "vast",
                "max_instances": 4,
                "target_jobs_per_instance": 2,
                "offer": {"gpu_names": ["RTX 4090"], "interruptible": True, "max_dph": 0.30},
            },
            "od": {
                "provider": "vast",
                "max_instances": 4,
                "target_jobs_per_instance": 2,
                "offer": {"gpu_names": ["RTX A6000"], "interruptible": False},
            },
        },
        **top,
    }
    return from_dict(raw)


def queue_of(r: Any) -> str:
    return (r.label or "").rsplit(":", 1)[-1]


@pytest.mark.usefixtures("env")
def test_two_queues_with_work_share_the_caps(db: Client, vast: VastProvider, standin: VastStandin) -> None:
    for _ in range(4):
        standin.add_offer(gpu_name="RTX 4090", min_bid=0.20)  # $0.2325/h each as a bid
    for _ in range(2):
        standin.add_offer(gpu_name="RTX A6000", dph_base=0.35)  # $0.3625/h on-demand
    enqueue(db, 10, queue="bid")
    enqueue(db, 10, queue="od")
    m = manager(db, vast, two_queues())
    tick(m)
    # Before: bid took three ($0.70/h) and od, 10 queued, got nothing for 13 minutes.
    assert sorted(queue_of(r) for r in our_live(standin).values()) == ["bid", "od"]
    assert standin.committed_rate() <= 0.8


@pytest.mark.usefixtures("env")
def test_a_starved_queue_gets_room_made_and_says_why_until_then(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    for _ in range(4):
        standin.add_offer(gpu_name="RTX 4090", min_bid=0.20)
    standin.add_offer(gpu_name="RTX A6000", dph_base=0.35)
    enqueue(db, 10, queue="bid")
    m = manager(db, vast, two_queues())
    tick(m)
    assert len(our_live(standin)) == 3  # bid alone: three fit under $0.80/h

    enqueue(db, 10, queue="od")
    made = tick(m)
    holds = {a.queue: a.reason for a in made.actions if isinstance(a, Hold)}
    assert holds["od"].startswith("queue od gets no instance: 10 queued")
    assert "is over the total cap" in holds["od"] and "making room: stopping" in holds["od"]
    assert holds["bid"].startswith("queue bid gets no more instances: ")  # it wants four, has three
    assert any(line.startswith("queue od gets no instance") for line in made.lines)  # logged
    for _ in range(2):
        tick(m)
        assert standin.committed_rate() <= 0.8
    live = sorted(queue_of(r) for r in our_live(standin).values())
    assert "od" in live and "bid" in live


@pytest.mark.usefixtures("env")
def test_a_queue_with_work_and_no_offer_says_why(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer(gpu_name="RTX 4090", min_bid=0.20)
    enqueue(db, 2, queue="od")
    m = manager(db, vast, two_queues())
    result = tick(m)
    (hold,) = [a for a in result.actions if isinstance(a, Hold)]
    assert hold.queue == "od" and hold.reason.endswith("no offer matches its filter")
    assert not any(isinstance(a, Rent) for a in result.actions)
    assert not any(line.startswith("nothing to do") for line in result.lines)


def _queue(**offer: Any) -> dict[str, Any]:
    return {
        "provider": "vast",
        "max_instances": 4,
        "target_jobs_per_instance": 2,
        "idle_timeout_s": 600,
        "offer": {"gpu_names": ["RTX 4090"], "interruptible": True, **offer},
    }


@pytest.mark.usefixtures("env")
def test_a_listing_that_dips_and_comes_back_is_no_markup(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    # Whether Vast lists a loading or stopped instance at another price cannot be checked from here: a
    # listing below the rent and back up again must not price the machine above its offers.
    standin.add_offer(min_bid=0.20, machine_id=501)
    enqueue(db, 1)
    m = manager(db, vast)
    (rented,) = tick(m).rented
    pid = int(rented.split(":", 1)[1])
    standin.row_overrides[pid] = {"dph_total": STORAGE_60GB}  # storage alone, say, while it loads
    assert tick(m).reconcile.price_changes
    del standin.row_overrides[pid]
    back = tick(m)
    assert back.reconcile.price_changes and back.reconcile.markups == {}
    assert rows(db, "select * from gpuq.machine_markups()") == []
