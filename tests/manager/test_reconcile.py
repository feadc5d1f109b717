"""Reconciliation against the Vast stand-in's faults: orphans, lost instances, outbids, lying destroys."""

# The fixtures are test_tick's, imported by name (tests/manager has no conftest of ours), so the test
# parameters "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import pytest

from gpuq.client import Client
from manager.providers.base import LaunchSpec, Offer, OfferFilter
from manager.providers.vast import VastProvider
from manager.reconcile import reconcile
from manager.tick import tick
from tests.manager.test_tick import (  # noqa: F401  (fixtures)
    assert_books_match,
    db,
    enqueue,
    env,
    host,
    manager,
    our_live,
    rows,
)
from tests.standins.vast_server import VastStandin

PREFIX = "gpuq:test:"


def rent_by_tick(db: Client, vast: VastProvider, standin: VastStandin, jobs: int = 1) -> tuple[int, str]:
    """A rent the manager made and recorded, its worker registered and holding `jobs` jobs."""
    standin.add_offer()
    enqueue(db, jobs)
    m = manager(db, vast)
    (rented,) = tick(m).rented
    pid = rented.split(":", 1)[1]
    inst = host(db, standin, pid)
    assert len(inst.claim(["tryon"], limit=jobs)) == jobs
    assert inst.instance_id is not None
    return inst.instance_id, pid


def rent_behind_our_back(vast: VastProvider, offer: Offer, label: str = PREFIX + "tryon") -> str:
    """An interruptible rent at the provider, bid as the manager bids, that the database knows nothing of."""
    return vast.create(offer, LaunchSpec(label, "img", 50, "true", bid_price=offer.bid))


def status_of(db: Client, iid: int) -> dict:
    (row,) = rows(db, "select * from gpuq.instances where id = %s", iid)
    return row


@pytest.mark.usefixtures("env")
def test_orphans_are_destroyed_and_booked_and_others_instances_left_alone(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    for _ in range(3):
        standin.add_offer()
    offers = vast.search_offers(OfferFilter())
    ours = rent_behind_our_back(vast, offers[0])
    theirs = rent_behind_our_back(vast, offers[1], "someone-else")
    other_deployment = rent_behind_our_back(vast, offers[2], "gpuq:prod:tryon")

    report = reconcile(db, {"vast": vast}, PREFIX)

    assert report.orphans_destroyed == [f"vast:{ours}"]
    assert set(map(str, standin.live())) == {theirs, other_deployment}
    (row,) = rows(db, "select * from gpuq.instances")
    assert (row["provider_instance_id"], row["status"]) == (ours, "failed")
    assert row["terminated_at"] is not None and float(row["dph"]) > 0
    (spend,) = rows(db, "select * from gpuq.spend_by_instance()")
    assert spend["instance_id"] == row["id"]  # its (short) billing is on the books


@pytest.mark.usefixtures("env")
def test_a_destroy_that_answers_success_but_keeps_billing_is_verified_and_retried(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    orphan = rent_behind_our_back(vast, vast.search_offers(OfferFilter())[0])
    standin.ghost_destroys = 2

    report = reconcile(db, {"vast": vast}, PREFIX)

    assert report.orphans_destroyed == [f"vast:{orphan}"] and not report.unverified
    assert our_live(standin) == {}
    assert len(standin.of_kind("destroy")) == 3  # two lies, then the one that took


@pytest.mark.usefixtures("env")
def test_a_destroy_that_never_takes_stays_on_the_books_as_billing(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    orphan = rent_behind_our_back(vast, vast.search_offers(OfferFilter())[0])
    standin.ghost_destroys = 100

    report = reconcile(db, {"vast": vast}, PREFIX)
    assert report.unverified == [f"vast:{orphan}"] and not report.orphans_destroyed
    # Still a live (failed) row: the policy counts its $/h against the caps and destroys it again.
    (row,) = rows(db, "select * from gpuq.manager_instances()")
    assert row["status"] == "failed" and row["provider_instance_id"] == orphan

    standin.ghost_destroys = 0
    tick(manager(db, vast))
    assert our_live(standin) == {}
    assert rows(db, "select * from gpuq.manager_instances()") == []


@pytest.mark.usefixtures("env")
def test_an_instance_the_provider_no_longer_shows_is_lost_and_its_jobs_released(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    iid, pid = rent_by_tick(db, vast, standin, jobs=2)
    standin.rentals[int(pid)].destroyed_at = standin.clock.now()  # gone behind our back

    report = reconcile(db, {"vast": vast}, PREFIX)

    assert report.lost == [iid]
    row = status_of(db, iid)
    assert row["status"] == "lost" and row["terminated_at"] is not None
    assert {j.status for j in db.list_jobs(queue="tryon")} == {"queued"}  # back in the queue, at once
    assert_books_match(db, standin)


@pytest.mark.usefixtures("env")
def test_a_failed_listing_marks_nothing_lost(db: Client, vast: VastProvider, standin: VastStandin) -> None:
    iid, _ = rent_by_tick(db, vast, standin)
    standin.fail_next(10, 503, "list")
    report = reconcile(db, {"vast": vast}, PREFIX)
    assert report.errors and not report.lost
    assert status_of(db, iid)["status"] == "busy"


@pytest.mark.usefixtures("env")
def test_an_outbid_instance_is_destroyed_and_its_jobs_released(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    iid, pid = rent_by_tick(db, vast, standin)
    standin.clock.advance(120)  # running
    standin.outbid(int(pid))  # stopped: processes dead, storage still billed

    result = tick(manager(db, vast))

    assert iid in result.reconcile.failed
    assert our_live(standin) == {}
    row = status_of(db, iid)
    assert row["status"] == "failed" and row["terminated_at"] is not None
    assert "outbid" in row["end_reason"]
    assert {j.status for j in db.list_jobs(queue="tryon")} == {"queued"}
    # Its job is back and nothing is serving the queue: the same tick rents a replacement only if an
    # offer is left (none is here), and nothing bills.
    assert standin.billing_rate() == 0


@pytest.mark.usefixtures("env")
def test_a_machine_whose_worker_left_is_destroyed_as_drained_and_booked_until_then(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    """A drained worker deregisters and exits; Vast bills the machine until it is destroyed. The books say
    so (the row stays draining, not terminated) and the next tick destroys it as drained, not as an
    orphan found later."""
    standin.add_offer()
    enqueue(db, 1)
    (rented,) = tick(manager(db, vast)).rented
    inst = host(db, standin, rented.split(":", 1)[1])
    (job,) = inst.claim(["tryon"], 1)
    assert job.lease_token is not None
    inst.complete(job.id, job.lease_token)
    inst.deregister("drained")
    iid = inst.instance_id
    row = status_of(db, iid)
    assert (row["status"], row["terminated_at"], row["secret_sha256"]) == ("draining", None, None)
    result = tick(manager(db, vast))
    assert result.destroyed == [iid] and result.reconcile.orphans_destroyed == []
    assert our_live(standin) == {}
    row = status_of(db, iid)
    assert row["status"] == "terminated" and row["end_reason"] == f"destroy {iid}: drained"


@pytest.mark.usefixtures("env")
def test_dead_instances_are_destroyed(db: Client, vast: VastProvider, standin: VastStandin) -> None:
    iid, pid = rent_by_tick(db, vast, standin)
    standin.set_status(int(pid), "exited")
    report = reconcile(db, {"vast": vast}, PREFIX)
    assert report.failed == [iid] and our_live(standin) == {}
    assert "dead at vast" in status_of(db, iid)["end_reason"]
