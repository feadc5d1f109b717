"""The dashboard's SQL (0009): pausing in the queue contract, the controls and their record of who acted,
and the reads the page shows, against real Postgres."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gpuq.client import Client, InstanceClient, InvalidRequest, JobNotFound, NotAuthorized
from tests.conftest import enroll

MIGRATIONS = Path(__file__).resolve().parent.parent / "sql" / "migrations"


def actions(client: Client) -> list[tuple[str, str, str, str | None]]:
    return [
        (r["actor"], r["action"], r["target"], r["outcome"])
        for r in client.call("select * from gpuq.dashboard_actions() order by id")
    ]


@pytest.fixture(autouse=True)
def clean(client: Client) -> None:
    client.conn.execute("truncate gpuq.queue_settings, gpuq.operator_actions, gpuq.avoided_machines")


# --------------------------------------------------------------------------------------------- pausing


def test_a_paused_queue_is_not_claimed_and_resuming_makes_it_claimable_again(
    client: Client, instance: InstanceClient
) -> None:
    worker = enroll(client, ("q", "other"))
    q_job, other_job = client.enqueue("q", {}), client.enqueue("other", {})
    assert client.call("select gpuq.pause_queue('q', 'alice', 'bad model') as p")[0]["p"] is True

    claimed = worker.claim(None, 10)
    assert [j.id for j in claimed] == [other_job]  # the other queue is served as before
    assert worker.claim(["q"], 10) == []  # named explicitly: still nothing
    assert client.get(q_job).status == "queued"
    paused = client.call("select * from gpuq.paused_queues()")
    assert [(r["queue"], r["paused_by"], r["reason"]) for r in paused] == [("q", "alice", "bad model")]

    assert client.call("select gpuq.resume_queue('q', 'bob') as r")[0]["r"] is True
    assert [j.id for j in worker.claim(None, 10)] == [q_job]
    assert client.call("select * from gpuq.paused_queues()") == []
    assert actions(client) == [
        ("alice", "pause_queue", "q", "paused"),
        ("bob", "resume_queue", "q", "resumed"),
    ]


def test_pausing_twice_keeps_the_first_pause_and_says_so(client: Client) -> None:
    assert client.call("select gpuq.pause_queue('q', 'alice', 'first') as p")[0]["p"] is True
    assert client.call("select gpuq.pause_queue('q', 'bob', 'second') as p")[0]["p"] is False
    [row] = client.call("select * from gpuq.paused_queues()")
    assert (row["paused_by"], row["reason"]) == ("alice", "first")
    assert client.call("select gpuq.resume_queue('nothing', 'bob') as r")[0]["r"] is False
    assert [a[3] for a in actions(client)] == ["paused", "already paused", "was not paused"]


def test_a_paused_queue_with_no_jobs_is_listed_with_who_paused_it(client: Client) -> None:
    client.enqueue("busy", {})
    client.call("select gpuq.pause_queue('empty', 'alice')")
    rows = {r["queue"]: r for r in client.call("select * from gpuq.dashboard_queues()")}
    assert set(rows) == {"busy", "empty"}
    assert rows["empty"]["paused_by"] == "alice" and rows["empty"]["queued"] == 0
    assert rows["busy"]["paused_at"] is None and rows["busy"]["queued"] == 1


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        ("select gpuq.pause_queue(%s, 'alice')", ("Bad Name",)),
        ("select gpuq.pause_queue(%s, 'alice')", ("x" * 64,)),
        ("select gpuq.pause_queue('q', %s)", ("",)),
        ("select gpuq.pause_queue('q', %s)", ("a" * 101,)),
        ("select gpuq.operator_cancel_job(1, %s)", (None,)),
    ],
)
def test_bad_names_and_actors_are_refused_and_change_nothing(
    client: Client, sql: str, args: tuple[Any, ...]
) -> None:
    client.enqueue("q", {})
    with pytest.raises((InvalidRequest, psycopg.errors.NotNullViolation)):
        client.call(sql, args)
    assert client.call("select * from gpuq.paused_queues()") == []
    assert actions(client) == []
    assert client.get(1).status == "queued"


def test_claim_jobs_is_0006s_with_only_the_paused_filter_added() -> None:
    """0009 restates claim_jobs: the same text as 0006 (its plan settings included) plus the one filter."""

    def claim_jobs(name: str) -> list[str]:
        text = (MIGRATIONS / name).read_text()
        body = re.search(r"create (?:or replace )?function gpuq\.claim_jobs\(.*?\nend \$\$;", text, re.S)
        assert body is not None
        return body[0].replace("create or replace function", "create function").splitlines()

    before, after = claim_jobs("0006_trust.sql"), claim_jobs("0009_dashboard.sql")
    added = [line for line in after if line not in before]
    assert [line.strip() for line in added] == [
        "and not exists (select 1 from gpuq.queue_settings s",
        "where s.queue = name and s.paused_at is not null)",
    ]
    assert [line for line in after if line not in added] == before
    assert "set plan_cache_mode = force_generic_plan set jit = off as $$" in after


# -------------------------------------------------------------------------------------------- controls


def test_operator_cancel_of_a_running_job_asks_its_worker_and_records_who(
    client: Client, instance: InstanceClient
) -> None:
    job = client.enqueue("q", {})
    [claimed] = instance.claim(None, 1)
    status = client.call("select gpuq.operator_cancel_job(%s, 'alice', 'stuck') as s", (job,))[0]["s"]
    assert status == "running"
    assert client.get(job).cancel_requested_at is not None
    reply = instance.heartbeat([(job, claimed.lease_token)])  # type: ignore[list-item]
    assert reply.cancel == [(job, claimed.lease_token)]
    [row] = client.call("select * from gpuq.dashboard_actions()")
    assert (row["actor"], row["action"], row["target"], row["reason"]) == (
        "alice",
        "cancel_job",
        str(job),
        "stuck",
    )
    assert row["outcome"] == "cancel requested from its worker"


def test_operator_retry_is_recorded_and_a_refused_one_records_nothing(client: Client) -> None:
    queued, cancelled = client.enqueue("q", {}), client.enqueue("q", {})
    client.call("select gpuq.operator_cancel_job(%s, 'alice')", (cancelled,))
    client.call("select gpuq.operator_retry_job(%s, 'bob')", (cancelled,))
    assert client.get(cancelled).status == "queued"
    with pytest.raises(InvalidRequest, match="only failed or cancelled jobs can be retried"):
        client.call("select gpuq.operator_retry_job(%s, 'mallory')", (queued,))
    with pytest.raises(JobNotFound):
        client.call("select gpuq.operator_cancel_job(999999, 'mallory')")
    assert actions(client) == [
        ("alice", "cancel_job", str(cancelled), "cancelled"),
        ("bob", "retry_job", str(cancelled), "queued again"),
    ]


def test_operator_drain_stops_claims_and_names_the_operator_in_the_instance_events(
    client: Client, instance: InstanceClient
) -> None:
    client.enqueue("q", {})
    status = client.call(
        "select gpuq.operator_drain_instance(%s, 'alice', 'flaky GPU') as s", (instance.instance_id,)
    )[0]["s"]
    assert status == "draining"
    assert instance.claim(None, 1) == []
    [event] = client.call(
        "select message from gpuq.instance_events where instance_id = %s and event = 'draining'",
        (instance.instance_id,),
    )
    assert event["message"] == "drained by alice: flaky GPU"
    assert actions(client) == [("alice", "drain_instance", str(instance.instance_id), "draining")]


def test_operator_destroy_revokes_the_instance_and_hands_its_jobs_back(
    client: Client, instance: InstanceClient
) -> None:
    job = client.enqueue("q", {})
    [claimed] = instance.claim(None, 1)
    n = client.call("select gpuq.operator_destroy_instance(%s, 'alice') as n", (instance.instance_id,))[0][
        "n"
    ]
    assert n == 1
    assert client.get(job).status == "queued"
    with pytest.raises(NotAuthorized):  # its secret died with it: the host can do nothing more
        instance.heartbeat([(job, claimed.lease_token)])  # type: ignore[list-item]
    [row] = client.call(
        "select status, end_reason from gpuq.instances where id = %s", (instance.instance_id,)
    )
    assert (row["status"], row["end_reason"]) == ("failed", "destroyed by alice")
    assert actions(client) == [
        ("alice", "destroy_instance", str(instance.instance_id), "revoked; 1 job(s) back in the queue")
    ]


# ----------------------------------------------------------------------------------------------- reads


def test_queue_depth_history_counts_each_wait_at_the_points_it_spans(client: Client) -> None:
    """Three jobs with known waits, one hour in 15-minute steps: the depth at each point is the number of
    jobs waiting then."""
    ran, waiting, scheduled = client.enqueue("q", {}), client.enqueue("q", {}), client.enqueue("q", {})
    worker = enroll(client)
    [claimed] = worker.claim(None, 1)
    worker.complete(claimed.id, claimed.lease_token)  # type: ignore[arg-type]
    assert claimed.id == ran
    # ran: waited from -50 min to -20 min; waiting: since -35 min; scheduled: claimable only in 10 min
    ago = "now() - interval '{} minutes'"
    client.conn.execute(
        f"update gpuq.jobs set created_at = {ago.format(50)}, run_after = {ago.format(50)},"
        f" started_at = {ago.format(20)}, finished_at = {ago.format(19)} where id = %s",
        (ran,),
    )
    client.conn.execute(
        f"update gpuq.jobs set created_at = {ago.format(35)}, run_after = {ago.format(35)} where id = %s",
        (waiting,),
    )
    client.conn.execute(
        "update gpuq.jobs set run_after = now() + interval '10 minutes' where id = %s", (scheduled,)
    )
    rows = client.call("select * from gpuq.dashboard_queue_depth('1 hour', '15 minutes') order by at")
    # points at -60, -45, -30, -15, 0 min
    assert [r["depth"] for r in rows] == [0, 1, 2, 1, 1]
    assert {r["queue"] for r in rows} == {"q"}
    assert rows[-1]["at"] - rows[0]["at"] == timedelta(hours=1)


def test_fleet_history_counts_instances_their_price_and_spend(client: Client) -> None:
    iid = client.call(
        "select gpuq.record_rent('vast', 'p1', 'o1', 'm1', 'gpuq:t:q', 'A40', 1, 48000, 2.0, true, "
        "array['q']) as id"
    )[0]["id"]
    client.conn.execute(
        "update gpuq.instances set created_at = now() - interval '40 minutes' where id = %s", (iid,)
    )
    client.conn.execute(
        "update gpuq.instance_events set at = now() - interval '40 minutes' where instance_id = %s", (iid,)
    )
    rows = client.call("select * from gpuq.dashboard_fleet_history('1 hour', '30 minutes') order by at")
    assert [r["instances"] for r in rows] == [0, 1, 1]
    assert [float(r["dph"]) for r in rows] == [0, 2.0, 2.0]
    # $2/h for 10 then 40 minutes
    assert [float(r["spend_usd"]) for r in rows] == [
        0,
        pytest.approx(2 / 6, abs=1e-3),
        pytest.approx(4 / 3, abs=1e-3),
    ]
    money = client.call("select * from gpuq.dashboard_money()")[0]
    assert (float(money["dph_now"]), money["instances"]) == (2.0, 1)


@pytest.mark.parametrize(
    ("since", "step"), [("1 day", "0 seconds"), ("1 day", "-1 minute"), ("30 days", "1 minute")]
)
def test_history_refuses_a_step_that_is_not_positive_or_too_many_points(
    client: Client, since: str, step: str
) -> None:
    for fn in ("dashboard_queue_depth", "dashboard_fleet_history"):
        with pytest.raises(InvalidRequest, match="p_step must be positive"):
            client.call(f"select * from gpuq.{fn}(%s::interval, %s::interval)", (since, step))


def test_queue_and_failure_figures_agree_with_the_stats_functions(
    client: Client, instance: InstanceClient
) -> None:
    """dashboard_queues and dashboard_failures read through other indexes than queue_stats and failure_stats
    (0001); on the same rows they give the same figures."""
    for queue in ("a", "b"):
        for _ in range(4):
            client.enqueue(queue, {})
    client.enqueue("a", {}, run_after=client.call("select now() + interval '1 hour' as t")[0]["t"])
    instance = enroll(client, ("a", "b"))
    jobs = instance.claim(["a", "b"], 6)
    instance.complete(jobs[0].id, jobs[0].lease_token)  # type: ignore[arg-type]
    instance.fail(jobs[1].id, jobs[1].lease_token, "GPU_OOM", "oom", retryable=True)  # type: ignore[arg-type]
    instance.fail(jobs[2].id, jobs[2].lease_token, "INPUT_INVALID", "bad", retryable=False)  # type: ignore[arg-type]
    client.cancel(client.enqueue("b", {}))
    columns = [
        "queue",
        "queued",
        "scheduled",
        "running",
        "succeeded_1h",
        "failed_1h",
        "succeeded_24h",
        "failed_24h",
        "cancelled_24h",
        "run_p50",
        "per_minute_1h",
    ]
    live = {r["queue"]: r for r in client.call("select * from gpuq.dashboard_queues()")}
    day = client.call("select * from gpuq.dashboard_queue_outcomes()")
    ours = [{c: {**r, **live[r["queue"]]}[c] for c in columns} for r in day]
    theirs = [{c: r[c] for c in columns} for r in client.call("select * from gpuq.queue_stats()")]
    assert ours == theirs and [r["running"] for r in ours] == [1, 2]
    assert client.call("select * from gpuq.dashboard_failures()") == client.call(
        "select * from gpuq.failure_stats()"
    )
    assert {r["error_code"] for r in client.call("select * from gpuq.dashboard_failures()")} == {
        "GPU_OOM",
        "INPUT_INVALID",
    }


def test_dashboard_jobs_lists_running_and_the_last_finished(client: Client, instance: InstanceClient) -> None:
    done, running, queued = client.enqueue("q", {}), client.enqueue("q", {}), client.enqueue("q", {})
    jobs = {j.id: j for j in instance.claim(None, 2)}
    instance.progress(running, jobs[running].lease_token, 40, "halfway")  # type: ignore[arg-type]
    instance.complete(done, jobs[done].lease_token)  # type: ignore[arg-type]
    rows = client.call("select * from gpuq.dashboard_jobs(10)")
    assert [(r["id"], r["status"], r["progress"]) for r in rows] == [
        (running, "running", 40),
        (done, "succeeded", 100),
    ]
    assert queued not in {r["id"] for r in rows}


def test_dashboard_instances_lists_running_jobs_and_the_heartbeat_metrics(
    client: Client, instance: InstanceClient
) -> None:
    job = client.enqueue("q", {})
    [claimed] = instance.claim(None, 1)
    metrics = {
        "gpus": [{"index": 0, "utilization_percent": 87, "memory_used_mb": 1000, "memory_total_mb": 24000}]
    }
    instance.heartbeat([(job, claimed.lease_token)], metrics)  # type: ignore[list-item]
    [row] = client.call("select * from gpuq.dashboard_instances()")
    assert (row["id"], row["status"], row["running_jobs"], row["metrics"]) == (
        instance.instance_id,
        "busy",
        [job],
        metrics,
    )


def test_decisions_list_the_fleet_events_with_their_reasons_newest_first(client: Client) -> None:
    iid = client.call(
        "select gpuq.record_rent('vast', 'p1', 'o1', 'm1', 'gpuq:t:q', 'A40', 1, 48000, 0.4, true, "
        "array['q'], 'rent offer o1 for queue q: 3 queued') as id"
    )[0]["id"]
    client.call("select gpuq.record_destroy(%s, 'destroy 1: idle 10 min')", (iid,))
    client.call("select gpuq.avoid_machine('vast', 'm9', 'never ready')")
    rows = client.call("select * from gpuq.dashboard_decisions(10)")
    assert [(r["event"], r["message"]) for r in rows[1:]] == [
        ("destroyed", "destroy 1: idle 10 min"),
        ("rented", "rent offer o1 for queue q: 3 queued"),
    ]
    assert rows[0]["event"] == "avoid_machine" and rows[0]["message"].startswith("machine m9 until ")


# ---------------------------------------------------------------------------------------------- access


def allowed(client: Client, role: str, sql: str) -> bool:
    """Whether `role` may run `sql` (rolled back either way)."""
    try:
        with client.conn.transaction():
            client.conn.execute(f"set local role {role}")
            client.conn.execute(sql)
            raise psycopg.Rollback()
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


READS = [
    "select * from gpuq.dashboard_queues()",
    "select * from gpuq.dashboard_instances()",
    "select * from gpuq.dashboard_jobs()",
    "select * from gpuq.dashboard_money('Europe/Madrid')",
    "select * from gpuq.dashboard_decisions()",
    "select * from gpuq.dashboard_actions()",
    "select * from gpuq.dashboard_queue_depth()",
    "select * from gpuq.dashboard_fleet_history()",
    "select * from gpuq.dashboard_failures()",
    "select * from gpuq.paused_queues()",
]
CONTROLS = [
    "select gpuq.operator_cancel_job(1, 'alice')",
    "select gpuq.operator_retry_job(1, 'alice')",
    "select gpuq.operator_drain_instance(1, 'alice')",
    "select gpuq.operator_destroy_instance(1, 'alice')",
    "select gpuq.pause_queue('q', 'alice')",
    "select gpuq.resume_queue('q', 'alice')",
]


@pytest.mark.parametrize(
    ("role", "reads", "acts"),
    [
        ("gpuq_observer", True, False),
        ("gpuq_operator", True, True),
        ("gpuq_manager", True, True),
        ("gpuq_app", False, False),
        ("gpuq_worker", False, False),
    ],
)
def test_who_may_read_the_dashboard_and_who_may_act(
    client: Client, role: str, reads: bool, acts: bool
) -> None:
    client.enqueue("q", {})  # job 1 ...
    enroll(client)  # ... and instance 1, so that each control would succeed
    client.call("select gpuq.operator_cancel_job(1, 'setup')")  # retry needs a cancelled job
    assert {sql: allowed(client, role, sql) for sql in READS} == dict.fromkeys(READS, reads)
    assert {sql: allowed(client, role, sql) for sql in CONTROLS} == dict.fromkeys(CONTROLS, acts)
    assert not allowed(client, role, "select * from gpuq.operator_actions")  # functions only, no table
