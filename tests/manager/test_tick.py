"""Whole ticks against real Postgres and the real `vastai` SDK talking to the Vast stand-in.

After every scenario: no orphan of ours survives a tick, and what bills never passes the caps.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuq.client import Client, InstanceClient, new_secret, secret_hash
from manager.config import ManagerSettings, from_dict
from manager.metrics import Metrics
from manager.policy import Rent
from manager.providers.base import LaunchSpec
from manager.providers.vast import VastProvider
from manager.tick import Manager, TickResult, tick
from tests.conftest import ADMIN_URL
from tests.manager.conftest import VAST_KEY
from tests.manager.test_cost import finished_job
from tests.standins.vast_server import VastStandin

KEY = VAST_KEY  # the stand-in and the provider fixtures (conftest.py) use it
WORKER_URL = "postgresql://gpuq_worker:pw@db.example:5432/app"


def settings_for(**top: Any) -> ManagerSettings:
    queue = {
        "provider": "vast",
        "max_instances": top.pop("max_instances", 4),
        "target_jobs_per_instance": 2,
        "concurrency": 2,
        "idle_timeout_s": 600,
        "offer": {"gpu_names": ["RTX 4090"], "interruptible": True},
    }
    raw = {"daily_budget": 50.0, "max_total_dph": 5.0, "queues": {"tryon": queue}, **top}
    return from_dict(raw)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GPUQ_DAILY_BUDGET", "GPUQ_MAX_TOTAL_DPH", "GPUQ_BUDGET_TZ", "GPUQ_MANAGER_PROVIDERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUQ_DEPLOYMENT", "test")
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", WORKER_URL)
    monkeypatch.setenv("GPUQ_INSTALL_SPEC", "gpuq==0.1.0 --hash=sha256:" + "0" * 64)  # a pinned release
    monkeypatch.setenv("VAST_API_KEY", KEY)


@pytest.fixture
def db(client: Client) -> Client:
    client.conn.execute("truncate gpuq.avoided_machines, gpuq.manager_ticks, gpuq.machine_markups")
    return client


def manager(db: Client, vast: VastProvider, ms: ManagerSettings | None = None) -> Manager:
    lines: list[str] = []
    m = Manager(db, ms or settings_for(), {"vast": vast}, Metrics(), echo=lines.append)
    m.echoed = lines  # type: ignore[attr-defined]
    return m


def enqueue(db: Client, n: int, queue: str = "tryon") -> list[int]:
    return [db.enqueue(queue, {"n": i}) for i in range(n)]


def host(db: Client, standin: VastStandin, provider_id: str | int) -> InstanceClient:
    """What the rented machine's worker does: take the secret from its environment, register."""
    secret = standin.rentals[int(provider_id)].env["GPUQ_INSTANCE_SECRET"]
    inst = db.as_instance(secret)
    inst.register(gpu_name="RTX 4090")
    return inst


def recorded_rent(
    db: Client, provider_id: str, dph: float, interruptible: bool, reason: str | None = None
) -> InstanceClient:
    """A rent recorded as the manager records one (seeded here directly), and its worker, registered."""
    secret = new_secret()
    iid = db.call(
        "select gpuq.record_rent('vast', %s, 'o1', 'm1', 'gpuq:test:tryon', 'RTX 4090', 1, 24000, "
        "%s::numeric, %s, array['tryon'], %s, 2, %s) as id",
        (provider_id, dph, interruptible, reason, secret_hash(secret)),
    )[0]["id"]
    inst = db.as_instance(secret, iid)
    inst.register()
    return inst


def rows(db: Client, sql: str, *args: Any) -> list[dict[str, Any]]:
    return db.call(sql, args)


def our_live(standin: VastStandin) -> dict[int, Any]:
    return {i: r for i, r in standin.live().items() if (r.label or "").startswith("gpuq:test:")}


def assert_books_match(db: Client, standin: VastStandin) -> None:
    """Every instance of ours billing at the provider is a live row, and the reverse."""
    live_rows = {
        r["provider_instance_id"]
        for r in rows(db, "select provider_instance_id from gpuq.manager_instances() where provider = 'vast'")
    }
    assert {str(i) for i in our_live(standin)} == live_rows


# ----------------------------------------------------------------------------------------------- rent


@pytest.mark.usefixtures("env")
def test_tick_rents_for_the_backlog_and_records_each_rent_with_its_price(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    for dph in (0.40, 0.50, 0.60):
        standin.add_offer(dph_base=dph, min_bid=dph / 2)
    enqueue(db, 4)
    m = manager(db, vast)
    result = tick(m)

    assert not result.errors
    assert len(result.rented) == 2  # 4 queued / 2 per instance
    rentals = sorted(standin.rentals.values(), key=lambda r: r.price or 0)
    assert [r.rent_type for r in rentals] == ["bid", "bid"]
    assert [r.price for r in rentals] == [pytest.approx(0.22), pytest.approx(0.275)]  # the two cheapest
    for r in rentals:
        assert r.label == "gpuq:test:tryon"
        assert len(r.onstart or "") <= 4048 and "base64 -d" in (r.onstart or "")
        assert r.env["DATABASE_URL"] == WORKER_URL and r.env["GPUQ_QUEUES"] == "tryon=comfyui"
        assert KEY not in str(r.env) and KEY not in (r.onstart or "")

    # recorded at rent time: what the instance bills (the bid plus storage for the launch's disk)
    inst = rows(db, "select * from gpuq.instances order by dph")
    billed = sorted(r.dph_total for r in rentals)
    assert [(i["status"], i["interruptible"]) for i in inst] == [("requested", True)] * 2
    assert [float(i["dph"]) for i in inst] == [pytest.approx(b, abs=1e-4) for b in billed]
    events = rows(db, "select event, dph, message from gpuq.instance_events order by id")
    assert [e["event"] for e in events] == ["rented", "rented"]
    assert "for queue tryon: 4 queued, 0 running, 0 instance(s), need 2" in events[0]["message"]
    assert any(
        "rent offer" in line and f"${billed[0]:.2f}/h for queue tryon" in line for line in result.lines
    )

    # Next tick: the listing shows them: booting, and the price Vast bills (bid + storage) recorded.
    second = tick(m)
    assert not second.rented and not second.reconcile.orphans_destroyed
    statuses = rows(db, "select status, dph from gpuq.instances order by id")
    assert {s["status"] for s in statuses} == {"booting"}
    billed = {r.id: r.dph_total for r in standin.rentals.values()}
    for row in rows(db, "select provider_instance_id, dph from gpuq.instances"):
        assert float(row["dph"]) == pytest.approx(billed[int(row["provider_instance_id"])])
    assert_books_match(db, standin)


@pytest.mark.usefixtures("env")
def test_spend_never_passes_the_caps(db: Client, vast: VastProvider, standin: VastStandin) -> None:
    for _ in range(8):
        standin.add_offer(dph_base=0.40, min_bid=0.20)
    enqueue(db, 40)
    m = manager(db, vast, settings_for(max_total_dph=0.5, max_instances=10))
    for _ in range(3):
        tick(m)
        assert standin.billing_rate() <= 0.5
        assert_books_match(db, standin)
    assert len(standin.rentals) == 2  # 2 x (0.22 bid + storage) fits under $0.50/h; a third does not

    # A daily budget that is already spent: the policy sheds, the tick destroys (verified) at once.
    m.settings = settings_for(daily_budget=0.0001, max_total_dph=0.5, max_instances=10)
    tick(m)
    assert standin.billing_rate() == 0
    assert_books_match(db, standin)


@pytest.mark.usefixtures("env")
def test_a_failed_create_that_still_left_an_instance_is_destroyed_even_when_destroy_lies(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    enqueue(db, 1)
    standin.create_error_with_contract = 1  # error answer carrying new_contract, instance left stopped
    standin.ghost_destroys = 1  # and the provider's own cleanup destroy answers success, changes nothing
    m = manager(db, vast)
    result = tick(m)
    assert result.errors and not result.rented
    assert len(our_live(standin)) == 1  # left billing storage after this tick...
    assert rows(db, "select * from gpuq.instances") == []

    standin.offers.clear()  # nothing more to rent: this tick only repairs
    repair = tick(m)
    assert our_live(standin) == {}  # ...and no orphan survives the next one
    (leftover,) = standin.rentals
    assert repair.reconcile.orphans_destroyed == [f"vast:{leftover}"]
    (row,) = rows(db, "select * from gpuq.instances")
    assert row["status"] == "failed" and row["end_reason"].startswith("orphan")
    assert row["terminated_at"] is not None
    assert [e["event"] for e in rows(db, "select event from gpuq.instance_events order by id")] == [
        "rented",
        "destroyed",
    ]


@pytest.mark.usefixtures("env")
def test_a_rent_the_database_did_not_record_is_destroyed_in_the_same_tick(
    db: Client, vast: VastProvider, standin: VastStandin, caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes away between the provider's answer and the record (here: the manager's connection
    is cut inside the create call). Unrecorded, the machine would bill unseen until a later tick found it
    by label: it is destroyed at once instead."""
    standin.add_offer()
    enqueue(db, 1)
    backend = db.conn.info.backend_pid

    def cut_the_managers_connection(rental: Any) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (backend,))

    standin.on_create = cut_the_managers_connection
    with caplog.at_level("ERROR", logger="gpuq.manager"), pytest.raises(psycopg.OperationalError):
        tick(manager(db, vast))  # the rest of the tick fails on the dead connection, as it must
    assert len(standin.rentals) == 1 and our_live(standin) == {}
    assert "could not record it (terminating connection" in caplog.text and "destroyed it" in caplog.text
    with Client.connect(db.url, db.settings) as fresh:
        assert fresh.call("select count(*) as n from gpuq.instances")[0]["n"] == 0


@pytest.mark.usefixtures("env")
def test_a_provider_message_with_a_nul_does_not_stop_the_tick_destroying(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    # Provider text goes into the database (the reason an instance ended); Postgres text cannot hold
    # U+0000, and a tick that failed on it would leave the dead instance billing, tick after tick.
    standin.add_offer()
    enqueue(db, 1)
    m = manager(db, vast)
    assert tick(m).rented
    (iid,) = standin.rentals
    standin.set_status(iid, "exited", "OCI runtime create failed: \x00\x00 in /dev/nvidia0")
    result = tick(m)
    assert not result.errors
    assert our_live(standin) == {}
    (row,) = rows(db, "select status, end_reason from gpuq.instances")
    assert (
        row["status"] == "failed"
        and "OCI runtime create failed: \ufffd\ufffd in /dev/nvidia0" in row["end_reason"]
    )
    assert_books_match(db, standin)


@pytest.mark.usefixtures("env")
def test_a_tick_that_reconciled_every_provider_is_recorded_for_the_workers(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    # Rented workers end their machine when no manager looks after it (worker/main.py): a tick
    # counts only when every provider was listed and repaired.
    worker = db.as_instance(db.enroll(["tryon"])[1])
    assert worker.manager_silence_seconds() is None
    m = manager(db, vast)
    standin.fail_next(100, status=500, kind="list")  # Vast is down: this manager is blind
    assert tick(m).reconcile.errors
    assert worker.manager_silence_seconds() is None
    standin.clear_faults()
    assert not tick(m).reconcile.errors
    silence = worker.manager_silence_seconds()
    assert silence is not None and 0 <= silence < 5


@pytest.mark.usefixtures("env")
def test_dry_run_touches_neither_the_provider_nor_the_database(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    standin.add_offer()
    standin.add_offer()
    # An orphan to destroy and a backlog to rent for.
    orphan = vast.create(
        vast.search_offers(vast_filter())[0],
        LaunchSpec(label="gpuq:test:tryon", image="x", disk_gb=50, onstart="true", bid_price=0.22),
    )
    enqueue(db, 2)
    before = db_state(db)
    requests_before = len(standin.requests)
    m = manager(db, vast)

    result = tick(m, dry_run=True)

    assert db_state(db) == before
    kinds = {r.kind for r in standin.requests[requests_before:]}
    assert kinds <= {"list", "search"}  # reads only: no create, no destroy
    assert orphan in {str(i) for i in standin.live()}
    printed = "\n".join(m.echoed)  # type: ignore[attr-defined]
    assert f"[dry-run] would destroy orphan: vast instance {orphan}" in printed
    assert "[dry-run] rent offer" in printed and "for queue tryon" in printed
    assert any(isinstance(a, Rent) for a in result.actions)


def vast_filter() -> Any:
    from manager.providers.base import OfferFilter

    return OfferFilter(gpu_names=("RTX 4090",))


def db_state(db: Client) -> tuple[Any, ...]:
    return tuple(
        rows(db, f"select * from gpuq.{t} order by 1")
        for t in ("instances", "instance_events", "jobs", "job_events", "avoided_machines", "manager_ticks")
    )


def test_snapshot_counts_arrivals_over_an_hour_and_load_over_its_window(db: Client) -> None:
    ids = enqueue(db, 5, queue="arrivals")
    # Two jobs came 40 minutes ago (outside the 20-minute load window, inside the hour), one 70 minutes ago.
    db.conn.execute(
        "update gpuq.jobs set created_at = now() - interval '40 minutes' where id = any(%s)", (ids[:2],)
    )
    db.conn.execute(
        "update gpuq.jobs set created_at = now() - interval '70 minutes' where id = %s", (ids[2],)
    )
    _, secret = db.enroll(["arrivals"], gpu_name="A40")
    inst = db.as_instance(secret)
    (job,) = inst.claim(["arrivals"], limit=1)
    assert job.lease_token is not None
    inst.complete(job.id, job.lease_token, {})
    # It ran the last 10 of the 20 minutes: a mean load of 0.5 running jobs.
    db.conn.execute(
        "update gpuq.jobs set started_at = now() - interval '10 minutes', finished_at = now() where id = %s",
        (job.id,),
    )
    (q,) = [r for r in db.call("select * from gpuq.manager_queues()") if r["queue"] == "arrivals"]
    assert q["arrivals_per_hour"] == pytest.approx(4.0)  # 2 + the 2 just enqueued; not the one 70 min ago
    assert q["recent_load"] == pytest.approx(0.5, abs=0.01)
    (longer,) = [
        r for r in db.call("select * from gpuq.manager_queues('2 hours')") if r["queue"] == "arrivals"
    ]
    assert longer["arrivals_per_hour"] == pytest.approx(2.5)  # all 5 over 2 hours


def test_arrivals_count_every_job_created_in_the_hour_whatever_became_of_it(db: Client) -> None:
    """manager_queues() finds the hour's arrivals through indexes (queued, running, finished since): each
    kind is counted, and a job created earlier is not, however recently it finished."""
    inst = db.as_instance(db.enroll(["arr"], max_concurrency=10)[1])
    old_done, done, running, _queued, old_queued = enqueue(db, 5, queue="arr")
    db.conn.execute(
        "update gpuq.jobs set created_at = now() - interval '2 hours' where id = any(%s)",
        ([old_done, old_queued],),
    )
    jobs = {j.id: j for j in inst.claim(["arr"], 3)}  # the three oldest: old_done, done, running
    assert set(jobs) == {old_done, done, running}
    for job_id in (old_done, done):
        inst.complete(job_id, jobs[job_id].lease_token)  # type: ignore[arg-type]
    (q,) = [r for r in db.call("select * from gpuq.manager_queues()") if r["queue"] == "arr"]
    assert q["arrivals_per_hour"] == pytest.approx(3.0)  # done, running, queued
    assert (q["queued"], q["running"]) == (2, 1)


# ----------------------------------------------------------------------------------------------- money


def test_spend_per_instance_day_and_job_add_up(db: Client) -> None:
    inst = recorded_rent(db, "77", 3.6, True, "test")
    iid = inst.instance_id
    # Rented an hour ago (tests may set the clock back; the manager never writes rows itself).
    db.conn.execute("update gpuq.instances set created_at = now() - interval '1 hour' where id = %s", (iid,))
    db.conn.execute(
        "update gpuq.instance_events set at = now() - interval '1 hour' where instance_id = %s", (iid,)
    )
    a, b = enqueue(db, 2)
    for job in inst.claim(["tryon"], limit=2):
        assert job.lease_token is not None
        inst.complete(job.id, job.lease_token, {})
    # Ran 10 and 5 minutes (a succeeded attempt is recorded on the job row itself).
    db.conn.execute(
        "update gpuq.jobs set started_at = finished_at - interval '10 minutes' where id = %s", (a,)
    )
    db.conn.execute(
        "update gpuq.jobs set started_at = finished_at - interval '5 minutes' where id = %s", (b,)
    )
    db.call("select gpuq.record_price_change(%s, 7.2, 'test')", (iid,))
    db.conn.execute(
        "update gpuq.instance_events set at = now() - interval '30 minutes' where event = 'price_changed'"
    )
    db.call("select gpuq.record_destroy(%s, 'scale in', false)", (iid,))

    (inst,) = db.call("select * from gpuq.spend_by_instance()")
    assert float(inst["cost_usd"]) == pytest.approx(0.5 * 3.6 + 0.5 * 7.2, abs=0.01)  # 30 min at each price
    assert inst["hours"] == pytest.approx(1.0, abs=0.01)
    assert inst["status"] == "terminated" and inst["end_reason"] == "scale in"

    jobs = {r["job_id"]: r for r in db.call("select * from gpuq.spend_by_job()")}
    total = sum(float(r["cost_usd"]) for r in jobs.values())
    assert total == pytest.approx(
        float(inst["cost_usd"]), abs=0.001
    )  # idle time shared: all of it attributed
    assert float(jobs[a]["cost_usd"]) == pytest.approx(
        2 * float(jobs[b]["cost_usd"]), rel=0.01
    )  # by run time
    assert jobs[a]["run_seconds"] == pytest.approx(600, abs=1)

    days = db.call("select * from gpuq.spend_by_day('UTC', 2)")
    assert sum(float(d["cost_usd"]) for d in days) == pytest.approx(float(inst["cost_usd"]), abs=0.001)
    today = float(db.call("select gpuq.spend_today('UTC') as usd")[0]["usd"])
    assert 0 < today <= float(inst["cost_usd"]) + 1e-6


def test_a_destroy_recorded_after_the_worker_deregistered_bills_until_the_destroy(db: Client) -> None:
    inst = recorded_rent(db, "78", 3.6, False)
    iid = inst.instance_id
    db.conn.execute("update gpuq.instance_events set at = now() - interval '10 minutes'")  # rented 10 min ago
    inst.deregister("drained")  # the worker exited; the machine bills on until destroyed
    (row,) = db.call("select * from gpuq.instances")
    assert (row["status"], row["terminated_at"], row["secret_sha256"]) == ("draining", None, None)
    at = db.call("select now() as t")[0]["t"]
    db.call("select gpuq.record_destroy(%s, 'destroy 1: drained', true, %s)", (iid, at))
    (row,) = db.call("select * from gpuq.instances")
    assert row["terminated_at"] == at and row["status"] == "terminated"
    assert row["end_reason"] == "destroy 1: drained"
    (spend,) = db.call("select * from gpuq.spend_by_instance()")
    assert float(spend["cost_usd"]) == pytest.approx(3.6 / 6, abs=0.01)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text as {(sample name, sorted labels): value}, read by the library's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_describe_the_fleet(
    db: Client,
    vast: VastProvider,
    standin: VastStandin,
    env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    textfile = tmp_path / "collector" / "gpuq.prom"  # a directory that does not exist yet
    monkeypatch.setenv("GPUQ_METRICS_FILE", str(textfile))
    standin.add_offer()
    enqueue(db, 1)
    m = manager(db, vast)
    before = time.time()
    tick(m)
    after = time.time()

    # the textfile, /metrics and render() say the same
    text = textfile.read_text()
    assert m.metrics.render() == text
    server = m.metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics") as r:
            assert r.read().decode() == text
    finally:
        server.shutdown()
        server.server_close()

    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["gpuq_manager_ticks"] == "counter" and types["gpuq_manager_actions"] == "counter"
    assert types["gpuq_manager_instances"] == "gauge" and types["gpuq_manager_dph"] == "gauge"
    got = parse(text)
    (inst,) = rows(db, "select provider, status, dph from gpuq.instances")
    assert (inst["provider"], inst["status"]) == ("vast", "requested")
    assert got[("gpuq_manager_instances", (("provider", "vast"), ("status", "requested")))] == 1
    assert got[("gpuq_manager_dph", (("provider", "vast"),))] == pytest.approx(float(inst["dph"]))
    assert got[("gpuq_manager_queue_queued", (("queue", "tryon"),))] == 1
    assert got[("gpuq_manager_queue_running", (("queue", "tryon"),))] == 0
    assert 0 <= got[("gpuq_manager_queue_oldest_wait_seconds", (("queue", "tryon"),))] < after - before + 5
    assert got[("gpuq_manager_actions_total", (("kind", "rent"),))] == 1
    assert got[("gpuq_manager_ticks_total", ())] == 1
    assert got[("gpuq_manager_orphans_destroyed_total", ())] == 0
    assert got[("gpuq_manager_lost_total", ())] == 0
    assert got[("gpuq_manager_unverified_destroys", ())] == 0
    assert got[("gpuq_manager_daily_budget_usd", ())] == 50
    assert got[("gpuq_manager_max_total_dph", ())] == 5
    spent = float(db.call("select gpuq.spend_today('UTC') as usd")[0]["usd"])
    assert 0 <= got[("gpuq_manager_spend_today_usd", ())] <= spent
    assert before <= got[("gpuq_manager_last_tick_timestamp_seconds", ())] <= after
    assert 0 < got[("gpuq_manager_tick_duration_seconds", ())] <= after - before
    assert not [k for k in got if k[0] == "gpuq_manager_provider_errors_total"]

    tick(m)  # counters go on counting
    got = parse(textfile.read_text())
    assert got[("gpuq_manager_ticks_total", ())] == 2
    assert got[("gpuq_manager_actions_total", (("kind", "rent"),))] == 1


def test_metrics_forget_a_status_and_a_queue_that_are_gone(
    db: Client, vast: VastProvider, standin: VastStandin, env: None
) -> None:
    standin.add_offer()
    enqueue(db, 1)
    (other,) = enqueue(db, 1, queue="other")  # a queue no policy rents for: counted, never served
    m = manager(db, vast)
    tick(m)
    got = parse(m.metrics.render())
    assert got[("gpuq_manager_instances", (("provider", "vast"), ("status", "requested")))] == 1
    assert got[("gpuq_manager_queue_queued", (("queue", "other"),))] == 1

    # The stand-in now lists the instance (booting), and the other queue's only job is cancelled and
    # older than gpuq.manager_queues() looks back, so that queue is no longer in the snapshot.
    db.cancel(other)
    db.conn.execute("update gpuq.jobs set created_at = now() - interval '2 hours' where queue = 'other'")
    tick(m)
    got = parse(m.metrics.render())
    assert [r["status"] for r in rows(db, "select status from gpuq.instances")] == ["booting"]
    instances = {k[1]: v for k, v in got.items() if k[0] == "gpuq_manager_instances"}
    assert instances == {(("provider", "vast"), ("status", "booting")): 1}
    queues = {(k[0], k[1]) for k in got if k[0].startswith("gpuq_manager_queue_")}
    assert queues == {
        (name, (("queue", "tryon"),))
        for name in (
            "gpuq_manager_queue_queued",
            "gpuq_manager_queue_running",
            "gpuq_manager_queue_oldest_wait_seconds",
        )
    }


def rent_one_then_idle(
    db: Client, vast: VastProvider, standin: VastStandin
) -> tuple[TickResult, dict[str, Any]]:
    """A tick rents one instance for one job; the job is cancelled and the instance's worker registers
    (idle). The rent tick's result and the instance's row (id, provider_instance_id)."""
    standin.add_offer(dph_base=0.40, min_bid=0.2)
    enqueue(db, 1)
    rented = tick(manager(db, vast, settings_for(max_instances=1)))
    (row,) = rows(db, "select id, provider_instance_id from gpuq.instances")
    db.conn.execute("update gpuq.jobs set status = 'cancelled', finished_at = now()")
    host(db, standin, row["provider_instance_id"])
    return rented, row


@pytest.mark.usefixtures("env")
def test_rent_and_destroy_lines_name_the_instance_the_same_way(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    rented, row = rent_one_then_idle(db, vast, standin)
    name = f"instance {row['id']} (vast:{row['provider_instance_id']})"
    assert any(line.startswith("rent offer") and line.endswith(f"-> {name}") for line in rented.lines)
    db.conn.execute(
        "update gpuq.instances set created_at = now() - interval '2 hours', "
        "ready_at = now() - interval '1 hour', last_job_at = now() - interval '30 seconds'"
    )
    # A 10 s idle timeout: the line says seconds, not "idle 0 min".
    quick = settings_for(max_instances=1)
    queue = replace(quick.policy.queues["tryon"], idle_timeout_s=10.0)
    quick = replace(quick, policy=replace(quick.policy, queues={"tryon": queue}, cooldown_s=0.0))
    destroyed = tick(manager(db, vast, quick))
    line = next(x for x in destroyed.lines if x.startswith(f"destroy {row['id']}:"))
    assert "idle 30 s" in line and line.endswith(f"-> {name}")


@pytest.mark.usefixtures("env")
def test_dry_run_says_what_the_forecast_is(db: Client, vast: VastProvider, standin: VastStandin) -> None:
    standin.add_offer()
    m = manager(db, vast, settings_for(prewarm_s=2700))
    tick(m, dry_run=True)
    printed = "\n".join(m.echoed)  # type: ignore[attr-defined]
    assert "[dry-run] forecast tryon: no history yet, nothing pre-warmed" in printed
    finished_job(db, "tryon", timedelta(days=1) - timedelta(seconds=36), 36.0)  # this hour yesterday
    m = manager(db, vast, settings_for(prewarm_s=2700))
    tick(m, dry_run=True)
    printed = "\n".join(m.echoed)  # type: ignore[attr-defined]
    assert "[dry-run] forecast tryon: 1.0 jobs, 0.01 GPUs busy in the next hour" in printed


@pytest.mark.usefixtures("env")
def test_a_forecast_that_cannot_be_read_still_leaves_a_working_tick(
    db: Client, vast: VastProvider, standin: VastStandin, caplog: pytest.LogCaptureFixture
) -> None:
    # A database without 0011's forecast (or a manager role without its grant): the tick rents for its
    # queue and would run its caps and idle timeouts as always, only without pre-warming.
    standin.add_offer(dph_base=0.40, min_bid=0.2)
    enqueue(db, 1)
    db.conn.execute("alter function gpuq.queue_forecast(timestamptz, integer) rename to queue_forecast_gone")
    try:
        rented = tick(manager(db, vast, settings_for(max_instances=1, prewarm_s=2700)))
    finally:
        db.conn.execute(
            "alter function gpuq.queue_forecast_gone(timestamptz, integer) rename to queue_forecast"
        )
    assert any(line.startswith("rent offer") for line in rented.lines)
    assert "no forecast this tick" in caplog.text


@pytest.mark.usefixtures("env")
def test_prewarm_searches_and_rents_for_a_forecast_with_nothing_queued(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    # Nothing queued now, but yesterday this hour had work: pre-warming keeps one ready, so the tick must
    # search offers for it (it searched only for queued demand, and the forecast's rent never came).
    standin.add_offer(dph_base=0.40, min_bid=0.2)
    finished_job(db, "tryon", timedelta(days=1) - timedelta(seconds=36), 36.0)  # this hour yesterday
    rented = tick(manager(db, vast, settings_for(max_instances=1, prewarm_s=2700)))
    assert any(line.startswith("rent offer") and "forecast" in line for line in rented.lines), rented.lines
    assert len(rows(db, "select id from gpuq.instances where terminated_at is null")) == 1


@pytest.mark.usefixtures("env")
def test_each_tick_books_idle_time_to_its_reason(
    db: Client, vast: VastProvider, standin: VastStandin
) -> None:
    _, row = rent_one_then_idle(db, vast, standin)
    db.conn.execute("update gpuq.manager_ticks set last_tick_at = now() - interval '30 seconds'")
    tick(manager(db, vast, settings_for(max_instances=1)))
    booked = rows(
        db, "select reason, seconds from gpuq.idle_ledger where instance_id = %s order by id", row["id"]
    )
    # The first tick booked the moment it rented it (requested); the second the half minute since.
    assert [r["reason"] for r in booked] == ["requested", "waiting for work (idle timeout 10 min)"]
    assert 0 < booked[1]["seconds"] <= 31
    # A dry run looks but books nothing.
    tick(manager(db, vast, settings_for(max_instances=1)), dry_run=True)
    assert len(rows(db, "select 1 from gpuq.idle_ledger where instance_id = %s", row["id"])) == 2
