"""The policy's side of issue 16, as a pure function: the caps shared between queues (and a Hold saying why
a queue with work gets nothing), offers priced at what their machine bills, no rent without a usable price,
a machine shed while booting avoided, timeouts logged as set."""

from __future__ import annotations

import dataclasses

from hypothesis import given

from manager.policy import (
    AvoidMachine,
    Destroy,
    Drain,
    Hold,
    PolicySettings,
    QueuePolicy,
    QueueSnapshot,
    Rent,
    Spend,
    Window,
    decide,
    in_window,
)
from manager.providers.base import OfferFilter
from tests.manager.test_policy import (
    NOON,
    PROPS,
    S,
    State,
    inst,
    make_settings,
    offer,
    rents,
    run,
    snap,
    states,
)


def two(max_total_dph: float = 0.8, daily_budget: float = 1000.0, **kw: object) -> PolicySettings:
    """Queue a (interruptible, A40) and queue b (on-demand, L40S)."""
    return PolicySettings(
        queues={
            "a": QueuePolicy(target_jobs_per_instance=2.0, offer_filter=OfferFilter(gpu_names=("A40",))),
            "b": QueuePolicy(
                target_jobs_per_instance=2.0,
                offer_filter=OfferFilter(gpu_names=("L40S",), interruptible=False),
            ),
        },
        max_total_dph=max_total_dph,
        daily_budget=daily_budget,
        **kw,  # type: ignore[arg-type]
    )


A_OFFERS = [offer(f"a{n}", 0.25, gpu="A40") for n in range(4)]
B_OFFERS = [offer(f"b{n}", 0.35, gpu="L40S", interruptible=False) for n in range(2)]


def holds(actions: list) -> list[Hold]:
    return [a for a in actions if isinstance(a, Hold)]


def queues(a: int, b: int, **kw: object) -> list[QueueSnapshot]:
    return [QueueSnapshot("a", a, 0, **kw), QueueSnapshot("b", b, 0, **kw)]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ sharing


def test_rents_go_round_by_round_so_every_queue_with_work_gets_one() -> None:
    actions = run(queues(10, 10), [], [*A_OFFERS, *B_OFFERS], two())
    assert sorted(r.queue for r in rents(actions)) == ["a", "b"]  # 0.25 + 0.35; a third is over $0.80/h
    assert holds(actions) == []


def test_the_queue_with_the_fewest_instances_rents_first() -> None:
    fleet = [inst("i1", S.BUSY, queue="a", dph=0.25, running=2)]
    actions = run(queues(10, 10), fleet, [*A_OFFERS, *B_OFFERS], two(max_total_dph=0.6))
    assert [r.queue for r in rents(actions)] == ["b"]  # 0.25 + 0.35 = 0.60


def test_a_starved_queue_gets_room_made_from_the_biggest_idle_first() -> None:
    fleet = [
        inst("i1", S.BUSY, queue="a", dph=0.25, running=2),
        inst("i2", S.IDLE, queue="a", dph=0.25),
        inst("i3", S.BOOTING, queue="a", dph=0.25, age_min=1),
    ]
    cfg = two(max_total_dph=0.85)
    actions = run(queues(4, 10), fleet, [*A_OFFERS, *B_OFFERS], cfg)  # 0.75 billing: b's 0.35 does not fit
    assert rents(actions) == []
    stopped = [a for a in actions if isinstance(a, Destroy | Drain)]
    assert [(type(a).__name__, a.instance.id) for a in stopped] == [("Destroy", "i2")]  # idle, not busy
    assert "to share the caps with queue b" in stopped[0].reason
    (hold,) = holds(actions)
    assert hold.queue == "b" and hold.reason.startswith("queue b gets no instance: 10 queued, 0 running")
    assert "is over the total cap: $0.75/h billing + $0.35/h > $0.85/h" in hold.reason
    assert hold.reason.endswith("making room: stopping i2 of queue a")
    # and the next tick, with i2 gone, b rents
    after = run(queues(4, 10), [fleet[0], fleet[2]], [*A_OFFERS, *B_OFFERS], cfg)
    assert [r.queue for r in rents(after)] == ["b"]


def test_room_is_made_from_several_when_one_is_not_enough_and_each_queue_keeps_one() -> None:
    fleet = [inst(f"i{n}", S.IDLE, queue="a", dph=0.25) for n in range(3)]
    actions = run(
        queues(6, 10), fleet, [*A_OFFERS, offer("big", 0.55, gpu="L40S", interruptible=False)], two()
    )
    stopped = sorted(a.instance.id for a in actions if isinstance(a, Destroy))
    assert len(stopped) == 2  # 0.75 - 2 x 0.25 + 0.55 = 0.80: fits; one would not
    (hold,) = holds(actions)
    assert "making room: stopping" in hold.reason
    # A queue down to one instance gives nothing: here b cannot fit even then, so nothing is stopped.
    too_big = [offer("huge", 0.70, gpu="L40S", interruptible=False)]
    actions = run(queues(6, 10), fleet, [*A_OFFERS, *too_big], two())
    assert not [a for a in actions if isinstance(a, Destroy | Drain)]
    (hold,) = holds(actions)
    assert "making room" not in hold.reason and "total cap" in hold.reason


def test_hold_says_why_when_the_daily_budget_leaves_a_queue_out() -> None:
    cfg = two(daily_budget=1.0, budget_tz="Europe/Madrid")  # noon: any rent bills 12 hours
    actions = run(queues(0, 3), [], B_OFFERS, cfg, spend=Spend(0.5))
    (hold,) = holds(actions)
    assert "is over the daily budget: spend today could reach $" in hold.reason and "> $1.0000" in hold.reason


def test_hold_says_why_when_no_offer_fits_or_the_window_is_closing() -> None:
    (hold,) = holds(run(queues(0, 3), [], A_OFFERS, two()))
    assert hold.reason.endswith("no offer matches its filter")
    busy = [offer("b0", 0.35, gpu="L40S", interruptible=False, machine="m-used")]
    fleet = [inst("x", S.BUSY, queue="a", dph=0.25, running=1)]
    fleet = [dataclasses.replace(fleet[0], machine_id="m-used")]
    (hold,) = holds(run(queues(1, 3), fleet, busy, two()))
    assert hold.reason.endswith("every matching offer is taken, or on a machine in use or avoided")
    closing = make_settings(windows=(Window.parse("09:00-12:10"),), tz="Europe/Madrid")
    (hold,) = holds(run([snap(queued=2)], [], [offer("a", 0.3)], closing))
    assert hold.reason.endswith("its allowed hours close in 10 min")


def test_a_served_queue_that_gets_no_more_says_why_and_one_without_work_says_nothing() -> None:
    assert holds(run(queues(0, 0), [], A_OFFERS, two())) == []
    fleet = [inst("i1", S.BUSY, queue="b", dph=0.35, running=2)]
    (hold,) = holds(run(queues(0, 8), fleet, [], two()))  # wants four, has one
    assert hold.reason == (
        "queue b gets no more instances: 8 queued, 0 running, 1 instance(s), need 4; "
        "no offer matches its filter"
    )
    # nothing is stopped to make room for a queue that has an instance
    fleet += [inst(f"a{n}", S.IDLE, queue="a", dph=0.2) for n in range(2)]
    actions = run(queues(0, 8), fleet, B_OFFERS, two(max_total_dph=0.8))
    assert not [a for a in actions if isinstance(a, Destroy | Drain)]
    (hold,) = holds(actions)
    assert "gets no more instances" in hold.reason and "total cap" in hold.reason


@PROPS
@given(states())
def test_property_a_queue_with_work_gets_an_instance_or_a_reason(state: State) -> None:
    actions = decide(
        state.queues,
        state.fleet,
        state.market,
        state.cfg,
        state.now,
        spend=state.spend,
        avoided_machines=state.avoided,
    )
    stopped = {a.instance.id for a in actions if isinstance(a, Destroy | Drain)}
    for q in state.queues:
        policy = state.cfg.queues[q.name]
        if q.queued == 0 or not in_window(policy, state.now) or policy.max_instances == 0:
            continue
        kept = [
            i
            for i in state.fleet
            if i.queue == q.name
            and i.id not in stopped
            and i.state in (S.REQUESTED, S.BOOTING, S.IDLE, S.BUSY)
        ]
        if kept or any(isinstance(a, Rent) and a.queue == q.name for a in actions):
            continue
        assert [h for h in holds(actions) if h.queue == q.name], (q, actions)


# ------------------------------------------------------------------------------------------ prices


def test_an_offer_without_a_usable_price_is_never_rented() -> None:
    market = [offer("neg", -0.2), offer("nan", float("nan")), offer("inf", float("inf")), offer("ok", 0.4)]
    assert [r.offer.offer_id for r in rents(run([snap(queued=9)], [], market, make_settings()))] == ["ok"]


def test_a_machine_that_billed_more_is_priced_at_what_it_bills() -> None:
    market = [offer("cheap", 0.20, machine="m1"), offer("fair", 0.30, machine="m2")]
    marked = decide(
        [snap(queued=1)], [], market, make_settings(), NOON, spend=Spend(0.0), price_markups={"m1": 0.2}
    )
    (rent,) = rents(marked)
    assert rent.offer.offer_id == "fair"  # 0.20 + 0.20 now dearer than 0.30
    both = decide(
        [snap(queued=3)], [], market, make_settings(), NOON, spend=Spend(0.0), price_markups={"m1": 0.2}
    )
    prices = {r.offer.offer_id: r.offer.dph for r in rents(both)}
    assert prices == {"fair": 0.30, "cheap": 0.40}  # rented, it is booked at what it bills
    capped = make_settings(offer_filter=OfferFilter(max_dph=0.35))
    assert not any(
        r.offer.offer_id == "cheap"
        for r in rents(
            decide([snap(queued=3)], [], market, capped, NOON, spend=Spend(0.0), price_markups={"m1": 0.2})
        )
    )


# ------------------------------------------------------------------------------------------ machines


def test_a_booting_instance_shed_by_the_caps_has_its_machine_avoided_a_while() -> None:
    fleet = [inst("boot", S.BOOTING, dph=0.5, age_min=3), inst("idle", S.IDLE, dph=0.4)]
    actions = run([snap(queued=0)], fleet, [], make_settings(max_total_dph=0.1, shed_avoid_s=1800))
    avoids = [(a.machine_id, a.for_s) for a in actions if isinstance(a, AvoidMachine)]
    assert avoids == [("machine-boot", 1800.0)]  # the idle one was ready: its machine works
    (avoid,) = [a for a in actions if isinstance(a, AvoidMachine)]
    assert "shed after 3 min booting (billing $0.50/h > cap $0.10/h)" in avoid.reason
    none = run([snap(queued=0)], fleet, [], make_settings(max_total_dph=0.1, shed_avoid_s=0))
    assert not [a for a in none if isinstance(a, AvoidMachine)]


def test_the_ready_timeout_is_logged_as_it_was_set() -> None:
    booting = [inst("b", S.BOOTING, age_min=95 / 60)]
    (destroy,) = [
        a for a in run([snap()], booting, [], make_settings(ready_timeout_s=90)) if isinstance(a, Destroy)
    ]
    assert "not ready after 95 s (ready timeout 90 s)" in destroy.reason  # it said "2 min"
    booting = [inst("b", S.BOOTING, age_min=21)]
    cfg = make_settings(ready_timeout_s=1200)
    (destroy,) = [a for a in run([snap()], booting, [], cfg) if isinstance(a, Destroy)]
    assert "not ready after 21 min (ready timeout 20 min)" in destroy.reason
