"""VastProvider through the real `vastai` SDK against the local stand-in of Vast's API.

Time is simulated (SimClock, shared by the provider's pacing and the stand-in), so rate limits, boots,
backoff and charges run without waiting. Each test states what is left billing afterwards.
"""

from __future__ import annotations

import itertools
import logging
from datetime import UTC, datetime

import pytest

from manager.providers.base import LaunchSpec, Offer, OfferFilter, ProviderError, ProviderStatus
from manager.providers.vast import DEFAULT_LIMITS, VastProvider, map_status
from tests.manager.conftest import VAST_KEY
from tests.standins.vast_server import OCI_MSG, RUNNING_AT_S, SimClock, VastStandin

KEY = VAST_KEY  # the stand-in and the provider fixtures (conftest.py) use it
LABEL = "gpuq:test:tryon"


def spec(bid: float | None, **kw: object) -> LaunchSpec:
    args: dict = {
        "label": LABEL,
        "image": "ghcr.io/acme/gpuq-comfy:1",
        "disk_gb": 60,
        "onstart": "#!/bin/bash\necho start",
        "env": {"GPUQ_QUEUE": "tryon"},
        "bid_price": bid,
    }
    args.update(kw)
    return LaunchSpec(**args)


def rent_one(vast: VastProvider, standin: VastStandin, *, bid: bool = True) -> tuple[Offer, str]:
    if not standin.offers:
        standin.add_offer()
    offer = vast.search_offers(OfferFilter(interruptible=bid))[0]
    return offer, vast.create(offer, spec(offer.dph if bid else None))


def statuses(vast: VastProvider) -> dict[str, ProviderStatus]:
    return {i.provider_id: i.status for i in vast.list_instances("gpuq:")}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------------------------------------- search


def test_search_maps_filters_to_the_api_query_and_units(vast: VastProvider, standin: VastStandin) -> None:
    good = standin.add_offer(gpu_name="RTX 4090", gpu_ram=24_564, dph_base=0.40, min_bid=0.20)
    standin.add_offer(gpu_name="RTX 4090", gpu_ram=24_564, verified=False)
    standin.add_offer(gpu_name="RTX 3060", gpu_ram=12_288)
    standin.add_offer(gpu_name="RTX 4090", gpu_ram=24_564, geolocation="Texas, US")
    standin.add_offer(gpu_name="RTX 4090", gpu_ram=24_564, disk_space=20)
    standin.add_offer(gpu_name="RTX 4090", gpu_ram=24_564, reliability=0.80)
    standin.add_offer(gpu_name="RTX 4090", gpu_ram=24_564, dph_base=1.50, min_bid=0.95)

    f = OfferFilter(
        gpu_names=("RTX_4090",),
        min_vram_mb=20_000,
        max_dph=1.0,
        min_reliability=0.95,
        locations=("ES", "FR"),
        min_disk_gb=50,
        interruptible=True,
    )
    offers = vast.search_offers(f)

    assert [o.offer_id for o in offers] == [str(good)]
    o = offers[0]
    assert o.interruptible and o.min_bid == 0.20
    assert o.bid == pytest.approx(0.22)  # the bid we would place: min_bid plus the 10 % margin
    # what it would bill, which the money caps see: the bid plus storage for the searched 50 GB
    assert o.dph == pytest.approx(0.22 + 0.15 * 50 / 720, abs=1e-4)
    assert (o.vram_mb, o.location, o.verified, o.gpu_name) == (24_564, "ES", True, "RTX 4090")

    (req,) = standin.of_kind("search")
    assert (req.method, req.path) == ("POST", "/api/v0/bundles/")
    q = req.body
    assert q["type"] == "bid"
    assert q["gpu_name"] == {"in": ["RTX 4090"]}  # spaces, as the API spells them
    assert q["gpu_ram"] == {"gte": 20_000}  # MB
    assert q["verified"] == {"eq": True} and q["rentable"] == {"eq": True} and q["rented"] == {"eq": False}
    assert q["allocated_storage"] == 50 and q["disk_space"] == {"gte": 50}
    assert q["order"] == [["dph_total", "asc"]]
    assert "dph_total" not in q  # a bid's price is checked client-side against the bid, not on-demand


def test_on_demand_search_prices_at_dph_total_and_filters_on_it(
    vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer(dph_base=0.40, storage_cost=0.0)
    standin.add_offer(dph_base=0.90, storage_cost=0.0)
    offers = vast.search_offers(OfferFilter(interruptible=False, max_dph=0.5, verified_only=False))
    assert [(o.dph, o.interruptible) for o in offers] == [(0.40, False)]
    q = standin.of_kind("search")[0].body
    assert q["type"] == "on-demand" and q["dph_total"] == {"lte": 0.5} and "verified" not in q


def test_search_is_cached_for_its_ttl(vast: VastProvider, standin: VastStandin, clock: SimClock) -> None:
    standin.add_offer()
    f = OfferFilter()
    assert vast.search_offers(f) == vast.search_offers(f)
    assert len(standin.of_kind("search")) == 1
    clock.advance(61)
    vast.search_offers(f)
    assert len(standin.of_kind("search")) == 2


def test_searches_are_paced_to_ten_a_minute(
    vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    standin.add_offer()
    t0 = clock.now()
    for n in range(25):
        vast.search_offers(OfferFilter(limit=n + 1))  # distinct filters: no cache hits
    times = standin.request_times("search")
    assert len(times) == 25
    assert all(r.status == 200 for r in standin.requests)  # the stand-in enforces the limit: no 429
    assert all(times[i + 10] - times[i] >= 60 for i in range(len(times) - 10))
    assert clock.now() - t0 >= 120  # 25 searches cannot fit in less than two minutes


def test_429_storm_backs_off_then_succeeds(vast: VastProvider, standin: VastStandin, clock: SimClock) -> None:
    standin.add_offer()
    standin.fail_next(3, 429, "search")
    assert len(vast.search_offers(OfferFilter())) == 1
    assert [r.status for r in standin.of_kind("search")] == [429, 429, 429, 200]
    assert clock.sleeps[:3] == [2.0, 4.0, 8.0]  # exponential backoff, no Retry-After to honour


def test_429_storm_that_outlasts_the_retries_raises_retryable(
    vast: VastProvider, standin: VastStandin
) -> None:
    standin.fail_next(50, 429, "list")
    with pytest.raises(ProviderError) as ei:
        vast.list_instances("gpuq:")
    assert ei.value.retryable
    assert len(standin.of_kind("list")) == 5  # our attempts, and the SDK adds none of its own


def test_search_quota_exceeded_is_not_retried(vast: VastProvider, standin: VastStandin) -> None:
    standin.search_quota_exceeded = True
    with pytest.raises(ProviderError) as ei:
        vast.search_offers(OfferFilter())
    assert ei.value.retryable and "search_quota_exceeded" in str(ei.value)
    assert len(standin.of_kind("search")) == 1


def test_5xx_on_reads_is_retried(vast: VastProvider, standin: VastStandin) -> None:
    rent_one(vast, standin)
    standin.fail_next(1, 500, "list")
    standin.fail_next(1, 502, "list")
    standin.fail_next(1, 503, "list")
    assert len(vast.list_instances("gpuq:")) == 1
    assert [r.status for r in standin.of_kind("list")] == [500, 502, 503, 200]


# ---------------------------------------------------------------------------------------------- create


def test_bid_rent_lifecycle_and_charges(vast: VastProvider, standin: VastStandin, clock: SimClock) -> None:
    standin.add_offer(dph_base=0.50, min_bid=0.20, storage_cost=0.0)
    offer = vast.search_offers(OfferFilter())[0]
    iid = vast.create(offer, spec(offer.bid))

    rental = standin.rentals[int(iid)]
    assert (rental.rent_type, rental.price) == ("bid", pytest.approx(0.22))
    assert rental.label == LABEL and rental.env == {"GPUQ_QUEUE": "tryon"} and rental.disk == 60
    create_req = standin.of_kind("create")[0]
    assert (create_req.method, create_req.path) == ("PUT", f"/api/v0/asks/{offer.offer_id}/")
    assert create_req.body["price"] == pytest.approx(0.22) and create_req.body["cancel_unavail"] is True
    assert create_req.body["onstart"] == "#!/bin/bash\necho start"

    (inst,) = vast.list_instances("gpuq:test:")
    assert inst.status == ProviderStatus.PROVISIONING and inst.label == LABEL
    assert inst.started_at == datetime.fromtimestamp(rental.created_at, UTC)
    clock.advance(RUNNING_AT_S)
    assert statuses(vast) == {iid: ProviderStatus.RUNNING}

    clock.advance(3600 - RUNNING_AT_S)
    vast.destroy(iid)
    assert vast.list_instances("gpuq:") == []
    assert standin.live() == {} and standin.billing_rate() == 0
    # an hour at the bid, not 0.50, less the minute it loaded (no storage here; the bid bills while running)
    assert standin.total_cost() == pytest.approx(0.22 * (3600 - RUNNING_AT_S) / 3600, rel=0.001)


def test_on_demand_rent_sends_no_price(vast: VastProvider, standin: VastStandin) -> None:
    _, iid = rent_one(vast, standin, bid=False)
    assert standin.rentals[int(iid)].rent_type == "on-demand"
    assert standin.of_kind("create")[0].body["price"] is None


def test_interruptible_offer_without_bid_is_refused_before_any_rent(
    vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    offer = vast.search_offers(OfferFilter(interruptible=True))[0]
    with pytest.raises(ProviderError):
        vast.create(offer, spec(None))  # would silently rent on-demand
    with pytest.raises(ProviderError):
        vast.create(offer, spec(offer.min_bid - 0.01))  # below the minimum: a stopped leftover
    assert standin.of_kind("create") == [] and standin.rentals == {}


def test_silent_on_demand_rent_is_caught_and_destroyed(vast: VastProvider, standin: VastStandin) -> None:
    standin.add_offer(dph_base=0.80, min_bid=0.20)
    standin.ignore_bid = True
    offer = vast.search_offers(OfferFilter())[0]
    with pytest.raises(ProviderError) as ei:
        vast.create(offer, spec(offer.bid))
    (rental,) = standin.rentals.values()
    assert rental.rent_type == "on-demand"  # what the server did
    assert ei.value.provider_id == str(rental.id)
    assert standin.live() == {}  # and nothing is left billing


def test_create_error_carrying_new_contract_destroys_the_leftover(
    vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    standin.create_error_with_contract = 1
    offer = vast.search_offers(OfferFilter())[0]
    with pytest.raises(ProviderError) as ei:
        vast.create(offer, spec(offer.bid))
    (rental,) = standin.rentals.values()
    assert ei.value.provider_id == str(rental.id)
    assert standin.live() == {} and standin.billing_rate() == 0
    destroy = standin.of_kind("destroy")
    assert [(d.method, d.path, d.status) for d in destroy] == [
        ("DELETE", f"/api/v0/instances/{rental.id}/", 200)
    ]


def test_offer_that_vanished_raises_retryable_and_leaves_the_cache(
    vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer(dph_base=0.30, min_bid=0.10)
    standin.add_offer(dph_base=0.40, min_bid=0.20)
    offers = vast.search_offers(OfferFilter())
    standin.take_offer(int(offers[0].offer_id))  # another renter was faster
    with pytest.raises(ProviderError) as ei:
        vast.create(offers[0], spec(offers[0].bid))
    assert ei.value.retryable and ei.value.provider_id is None and "no_such_ask" in str(ei.value)
    assert standin.rentals == {}
    # The next tick's search comes from the cache and no longer offers it.
    assert [o.offer_id for o in vast.search_offers(OfferFilter())] == [offers[1].offer_id]
    assert len(standin.of_kind("search")) == 1


def test_offers_vanishing_between_search_and_create(vast: VastProvider, standin: VastStandin) -> None:
    standin.add_offer()
    standin.vanish_after_search = True
    offer = vast.search_offers(OfferFilter())[0]
    with pytest.raises(ProviderError) as ei:
        vast.create(offer, spec(offer.bid))
    assert ei.value.retryable and standin.live() == {}


def test_5xx_on_create_is_not_retried(vast: VastProvider, standin: VastStandin) -> None:
    standin.add_offer()
    offer = vast.search_offers(OfferFilter())[0]
    standin.fail_next(1, 503, "create")
    with pytest.raises(ProviderError) as ei:
        vast.create(offer, spec(offer.bid))
    assert ei.value.retryable
    assert len(standin.of_kind("create")) == 1  # a retried create could rent twice


def test_429_on_create_is_retried_after_pacing(vast: VastProvider, standin: VastStandin) -> None:
    standin.add_offer()
    offer = vast.search_offers(OfferFilter())[0]
    standin.fail_next(2, 429, "create")
    iid = vast.create(offer, spec(offer.bid))
    assert list(standin.live()) == [int(iid)]
    times = standin.request_times("create")
    assert len(times) == 3 and all(g >= 4.5 for g in gaps(times))


def test_launch_limits_are_checked_before_renting(vast: VastProvider, standin: VastStandin) -> None:
    standin.add_offer()
    offer = vast.search_offers(OfferFilter())[0]
    for bad in (
        spec(offer.dph, onstart="x" * 4049),
        spec(offer.dph, label="gpuq:" + "x" * 260),
        spec(offer.dph, env={"BIG": "y" * 257}),
    ):
        with pytest.raises(ProviderError):
            vast.create(offer, bad)
    assert standin.of_kind("create") == []


def test_every_endpoint_is_paced(vast: VastProvider, standin: VastStandin) -> None:
    for _ in range(4):
        standin.add_offer()
    offers = vast.search_offers(OfferFilter())
    ids = [vast.create(o, spec(o.bid)) for o in offers]
    for _ in range(3):
        vast.list_instances("gpuq:")
    for iid in ids:
        vast.destroy(iid)
    assert all(r.status != 429 for r in standin.requests)
    for kind in ("create", "list", "show", "destroy"):
        times = standin.request_times(kind)
        assert len(times) >= 3, kind
        assert min(gaps(times)) >= DEFAULT_LIMITS[kind][1], kind
    assert standin.live() == {}


# ------------------------------------------------------------------------------------------ list and states


def test_list_pages_through_everything_and_matches_the_prefix(
    vast: VastProvider, standin: VastStandin
) -> None:
    for _ in range(32):
        standin.add_offer()
    offers = vast.search_offers(OfferFilter(limit=100))
    assert len(offers) == 32
    mine = set()
    for n, o in enumerate(offers):
        label = LABEL if n % 3 else "someone-else"
        iid = vast.create(o, spec(o.dph, label=label))
        if label == LABEL:
            mine.add(iid)
    found = vast.list_instances("gpuq:test:")
    assert {i.provider_id for i in found} == mine and len(mine) == 21
    pages = standin.of_kind("list")
    assert len(pages) == 2 and "after_token" in pages[1].query
    assert pages[0].path == "/api/v1/instances/"


@pytest.mark.parametrize("actual", ["exited", "unknown", "offline"])
def test_instances_that_will_never_run_are_dead(
    vast: VastProvider, standin: VastStandin, clock: SimClock, actual: str
) -> None:
    _, iid = rent_one(vast, standin)
    clock.advance(RUNNING_AT_S)
    standin.set_status(int(iid), actual)
    assert statuses(vast) == {iid: ProviderStatus.DEAD}
    assert standin.billing_rate() > 0  # dead, yet billing until destroyed
    vast.destroy(iid)
    assert standin.live() == {}


def test_oci_runtime_error_is_dead(vast: VastProvider, standin: VastStandin, clock: SimClock) -> None:
    standin.oci_on_create = True
    _, iid = rent_one(vast, standin)
    clock.advance(600)
    (inst,) = vast.list_instances("gpuq:")
    assert inst.provider_id == iid
    assert inst.status == ProviderStatus.DEAD and inst.status_msg == OCI_MSG
    assert inst.raw_status.startswith("created")


def test_stuck_loading_stays_provisioning_with_its_start_time(
    vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    standin.stuck_loading = True
    _, iid = rent_one(vast, standin)
    created = standin.rentals[int(iid)].created_at
    clock.advance(45 * 60)
    (inst,) = vast.list_instances("gpuq:")
    assert inst.status == ProviderStatus.PROVISIONING and inst.raw_status.startswith("loading")
    # What the manager's ready timeout works from.
    assert (clock.now() - inst.started_at.timestamp()) == pytest.approx(clock.now() - created)
    assert inst.started_at.timestamp() == pytest.approx(created)
    vast.destroy(iid)
    assert standin.live() == {}


def test_outbid_while_provisioning_is_stopped(
    vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    _, iid = rent_one(vast, standin)
    clock.advance(2)
    standin.outbid(int(iid))
    (inst,) = vast.list_instances("gpuq:")
    assert inst.status == ProviderStatus.STOPPED
    assert inst.raw_status == "null (cur=stopped, next=stopped, intended=stopped)"
    rental = standin.rentals[int(iid)]
    assert standin.billing_rate() == pytest.approx(rental.storage_dph)  # storage keeps billing
    vast.destroy(iid)
    assert standin.billing_rate() == 0


def test_outbid_while_running_is_stopped(vast: VastProvider, standin: VastStandin, clock: SimClock) -> None:
    _, iid = rent_one(vast, standin)
    clock.advance(RUNNING_AT_S + 10)
    assert statuses(vast) == {iid: ProviderStatus.RUNNING}
    standin.outbid(int(iid))
    assert statuses(vast) == {iid: ProviderStatus.STOPPED}


def test_destroy_that_answers_success_but_keeps_running_shows_in_the_next_list(
    vast: VastProvider, standin: VastStandin, clock: SimClock
) -> None:
    _, iid = rent_one(vast, standin)
    clock.advance(RUNNING_AT_S)
    standin.ghost_destroys = 1
    vast.destroy(iid)  # answers success
    assert statuses(vast) == {iid: ProviderStatus.RUNNING}  # the listing tells the truth
    assert standin.billing_rate() > 0
    vast.destroy(iid)  # the caller destroys again
    assert vast.list_instances("gpuq:") == [] and standin.live() == {}


def test_destroying_a_gone_instance_is_quiet(vast: VastProvider, standin: VastStandin) -> None:
    _, iid = rent_one(vast, standin)
    vast.destroy(iid)
    vast.destroy(iid)  # 404 no_such_instance: already what we wanted
    assert [r.status for r in standin.of_kind("destroy")] == [200, 404]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {
                "actual_status": None,
                "cur_state": "running",
                "next_state": "running",
                "intended_status": "running",
            },
            ProviderStatus.PROVISIONING,
        ),
        (
            {"actual_status": "loading", "cur_state": "running", "intended_status": "running"},
            ProviderStatus.PROVISIONING,
        ),
        (
            {"actual_status": "running", "cur_state": "running", "intended_status": "running"},
            ProviderStatus.RUNNING,
        ),
        (
            {
                "actual_status": None,
                "cur_state": "stopped",
                "next_state": "stopped",
                "intended_status": "stopped",
            },
            ProviderStatus.STOPPED,
        ),
        ({"actual_status": "stopped", "cur_state": "stopped"}, ProviderStatus.STOPPED),
        ({"actual_status": "frozen"}, ProviderStatus.STOPPED),
        ({"actual_status": "exited"}, ProviderStatus.DEAD),
        ({"actual_status": "unknown"}, ProviderStatus.DEAD),
        ({"actual_status": "offline"}, ProviderStatus.DEAD),
        ({"actual_status": "created", "status_msg": OCI_MSG}, ProviderStatus.DEAD),
    ],
)
def test_status_mapping(row: dict, expected: ProviderStatus) -> None:
    assert map_status(row) == expected


# ---------------------------------------------------------------------------------------------- secrets


def test_api_key_stays_out_of_logs_errors_and_repr(
    standin: VastStandin, clock: SimClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    vast = VastProvider(KEY, server_url=standin.url, clock=clock.now, sleep=clock.sleep)
    standin.add_offer()
    errors: list[str] = []
    standin.fail_next(2, 429)
    offer = vast.search_offers(OfferFilter())[0]
    standin.create_error_with_contract = 1
    try:
        vast.create(offer, spec(offer.bid))
    except ProviderError as e:
        errors.append(str(e))
    wrong = VastProvider("not-the-key", server_url=standin.url, clock=clock.now, sleep=clock.sleep)
    try:
        wrong.list_instances("gpuq:")
    except ProviderError as e:
        errors.append(str(e))
        assert not e.retryable and "401" in str(e)
    assert len(errors) == 2
    assert all(KEY not in text for text in [*errors, caplog.text, repr(vast)])
