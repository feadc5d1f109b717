"""A paused queue is not scaled: the policy rents nothing for it (its idle instances still go at the idle
timeout), and a whole tick on the Vast stand-in neither searches nor rents for it until it is resumed."""

from __future__ import annotations

import pytest

from gpuq.client import Client
from manager.policy import Destroy, InstanceState
from manager.providers.vast import VastProvider
from manager.state import read_snapshot
from manager.tick import tick
from tests.manager.test_policy import MARKET, inst, make_settings, rents, run, snap
from tests.manager.test_tick import enqueue, env, manager  # noqa: F401 (env: a fixture)
from tests.standins.vast_server import VastStandin


def test_the_policy_rents_nothing_for_a_paused_queue_with_a_backlog() -> None:
    assert len(rents(run([snap(queued=6)], [], MARKET, make_settings()))) == 3
    assert rents(run([snap(queued=6, paused=True)], [], MARKET, make_settings())) == []
    assert rents(run([snap(paused=True)], [], MARKET, make_settings(min_instances=2))) == []


def test_a_paused_queue_keeps_no_idle_instance_past_the_idle_timeout() -> None:
    """Its workers may claim nothing, so an idle one would bill for nothing however long the backlog."""
    idle = inst("1", InstanceState.IDLE, idle_min=30)
    busy = inst("2", InstanceState.BUSY, running=1)
    settings = make_settings(idle_timeout_s=600, cooldown_s=0)
    assert run([snap(queued=6)], [idle, busy], MARKET, settings) != []  # rents: it needs 3
    actions = run([snap(queued=6, running=1, paused=True)], [idle, busy], MARKET, settings)
    assert [(type(a), a.instance.id) for a in actions] == [(Destroy, "1")]  # the busy one finishes its job


@pytest.mark.usefixtures("env")
def test_a_tick_neither_searches_nor_rents_for_a_paused_queue_until_it_is_resumed(
    client: Client, vast: VastProvider, standin: VastStandin
) -> None:
    client.conn.execute("truncate gpuq.avoided_machines, gpuq.manager_ticks, gpuq.queue_settings")
    for dph in (0.40, 0.50):
        standin.add_offer(dph_base=dph, min_bid=dph / 2)
    enqueue(client, 4)
    client.call("select gpuq.pause_queue('tryon', 'alice', 'bad release')")
    m = manager(client, vast)
    snapshot = read_snapshot(client, "UTC", m.settings.label_prefix)
    assert [(q.name, q.queued, q.paused) for q in snapshot.queues] == [("tryon", 4, True)]

    result = tick(m)
    assert result.rented == [] and not result.errors
    assert standin.of_kind("search") == []  # no search spent on a queue that may not rent

    client.call("select gpuq.resume_queue('tryon', 'alice')")
    assert len(tick(m).rented) == 2
