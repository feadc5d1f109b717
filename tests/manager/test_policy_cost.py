"""The policy's cost levers: break-even hold, pre-warming from a forecast, the cold pool, packing."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from manager.policy import (
    ColdStart,
    ColdStop,
    Destroy,
    InstanceState,
    InstanceView,
    QueuePolicy,
    QueueSnapshot,
    Rent,
    Window,
)
from tests.manager.test_policy import MADRID, MARKET, NOON, S, inst, make_settings, rents, run, snap

WINDOW = {"windows": (Window.parse("09:00-01:00"),), "tz": "Europe/Madrid"}


def destroyed(actions: list) -> set[str]:
    return {a.instance.id for a in actions if isinstance(a, Destroy)}


def test_break_even_holds_one_idle_instance_while_reuse_is_cheaper_than_a_reboot() -> None:
    idle = [inst("i1", idle_min=15), inst("i2", idle_min=15, dph=0.5)]
    quiet = snap(arrivals_per_hour=6.0, recent_load=0.1)  # a job every 10 minutes
    # Without the lever both go at the 10-minute idle timeout.
    assert destroyed(run([quiet], idle, MARKET, make_settings(idle_timeout_s=600))) == {"i1", "i2"}
    # A reboot costs 20 minutes of billing and $0.40 of downloads; 10 minutes of idling at $0.40/h is $0.07:
    # the cheaper one is held, the second spare goes.
    held = make_settings(idle_timeout_s=600, reboot_s=1200, reboot_usd=0.40)
    assert destroyed(run([quiet], idle, MARKET, held)) == {"i2"}
    # With no arrivals in the last hour nothing says it will be reused: it goes.
    assert destroyed(run([snap(arrivals_per_hour=0.0)], idle, MARKET, held)) == {"i1", "i2"}
    # A job every 3 hours would cost more idling than a reboot.
    rare = snap(arrivals_per_hour=1 / 3)
    assert destroyed(run([rare], idle, MARKET, held)) == {"i1", "i2"}
    # A paused queue's arrivals cannot be claimed: holding a spare for them only bills.
    paused = snap(arrivals_per_hour=6.0, recent_load=0.1, paused=True)
    assert destroyed(run([paused], idle, MARKET, held)) == {"i1", "i2"}


def test_prewarm_rents_before_the_window_opens_for_the_forecast() -> None:
    before = datetime(2025, 3, 11, 8, 30, tzinfo=MADRID)  # the window opens at 09:00
    busy = snap(forecast_jobs=120.0, forecast_busy_s=120 * 45.0)  # 1.5 GPUs busy
    prewarm = make_settings(prewarm_s=2700, **WINDOW)
    actions = run([busy], [], MARKET, prewarm, now=before)
    got = rents(actions)
    assert len(got) == 2  # ceil(1.5 / 0.85)
    assert "forecast 120 jobs, 1.50 GPUs busy (window opens in 30 min): keep 2 ready" in got[0].reason
    # Off, too early, or no forecast: nothing rented before the window.
    assert rents(run([busy], [], MARKET, make_settings(**WINDOW), now=before)) == []
    early = datetime(2025, 3, 11, 7, 30, tzinfo=MADRID)
    assert rents(run([busy], [], MARKET, prewarm, now=early)) == []
    assert rents(run([snap()], [], MARKET, prewarm, now=before)) == []
    # What was pre-warmed is kept until the window opens, not stopped as "outside allowed hours".
    warm = [inst("i1", idle_min=20, now=before), inst("i2", idle_min=20, now=before)]
    assert destroyed(run([busy], warm, MARKET, prewarm, now=before)) == set()
    assert destroyed(run([busy], warm, MARKET, make_settings(**WINDOW), now=before)) == {"i1", "i2"}


def test_prewarm_keeps_what_the_next_hours_forecast_needs_in_the_window() -> None:
    idle = [inst("i1", idle_min=15), inst("i2", idle_min=15)]
    peak_ahead = snap(forecast_jobs=100.0, forecast_busy_s=100 * 50.0, recent_load=0.2)
    assert destroyed(run([peak_ahead], idle, MARKET, make_settings(idle_timeout_s=600))) == {"i1", "i2"}
    assert (
        destroyed(run([peak_ahead], idle, MARKET, make_settings(idle_timeout_s=600, prewarm_s=2700))) == set()
    )


def stopped(iid: str, cold_min: float, dph: float = 0.02) -> InstanceView:
    return dataclasses.replace(
        inst(iid, S.STOPPED, dph=dph), stopped_at=NOON - timedelta(minutes=cold_min), last_job_at=None
    )


def test_cold_pool_stops_idle_instances_and_starts_them_before_renting() -> None:
    cold = make_settings(idle_timeout_s=600, cold_pool_s=3 * 3600, cold_idle_s=120)
    # A spare idle 3 minutes: stopped into the cold pool (not destroyed), within the idle timeout; the last
    # running one stays until the idle timeout (a refused restart would cost its next job a full boot).
    two = [inst("i1", idle_min=3), inst("i2", idle_min=3, dph=0.5)]
    actions = run([snap()], two, MARKET, cold)
    assert [type(a) for a in actions] == [ColdStop]
    assert "into the cold pool: idle 3 min" in actions[0].reason
    assert run([snap(recent_load=0.0)], [inst("i1", idle_min=3)], MARKET, cold) == []
    # At the idle timeout the last one is stopped rather than destroyed.
    actions = run([snap(recent_load=0.0)], [inst("i1", idle_min=11)], MARKET, cold)
    assert [type(a) for a in actions] == [ColdStop]
    # Work comes back: the stopped instance is started, nothing rented.
    actions = run([snap(queued=1)], [stopped("i1", 30)], MARKET, cold)
    assert [type(a) for a in actions] == [ColdStart] and actions[0].instance.id == "i1"
    # More work than the pool holds: start it and rent the rest.
    actions = run([snap(queued=4)], [stopped("i1", 30)], MARKET, cold)
    assert [type(a) for a in actions] == [ColdStart, Rent]
    # Cold longer than cold_pool_s: destroyed.
    assert destroyed(run([snap()], [stopped("i1", 181)], MARKET, cold)) == {"i1"}
    # Near the window's close an idle instance is destroyed, not stopped (nothing would start it).
    late = datetime(2025, 3, 12, 0, 50, tzinfo=MADRID)
    idle_late = [inst("i1", idle_min=12, now=late)]
    actions = run(
        [snap()], idle_late, MARKET, make_settings(idle_timeout_s=600, cold_pool_s=3600, **WINDOW), now=late
    )
    assert destroyed(actions) == {"i1"} and not any(isinstance(a, ColdStop) for a in actions)


def test_stopped_instances_bill_only_their_disk_in_the_caps() -> None:
    # $0.45/h cap: a stopped instance's $0.02/h leaves room for a $0.40/h rent.
    capped = make_settings(max_total_dph=0.45, cold_pool_s=3600, max_instances=4)
    got = rents(run([snap(queued=5)], [stopped("i1", 30)], [MARKET[2]], capped))
    assert InstanceState.STOPPED.value == "stopped" and len(got) == 1


def test_packing_counts_the_small_queues_work_on_the_big_queues_instances() -> None:
    settings = make_settings()
    queues = {
        "tryon": dataclasses.replace(settings.queues["tryon"], packs=("tts",)),
        "tts": QueuePolicy(target_jobs_per_instance=2.0),
    }
    packed = dataclasses.replace(settings, queues=queues)
    tts = QueueSnapshot("tts", 3, 0)
    got = rents(run([snap(), tts], [], MARKET, packed))
    assert {r.queue for r in got} == {"tryon"} and len(got) == 2  # ceil(3 / 2), all for the host
    unpacked = dataclasses.replace(settings, queues={**queues, "tryon": settings.queues["tryon"]})
    assert {r.queue for r in rents(run([snap(), tts], [], MARKET, unpacked))} == {"tts"}
