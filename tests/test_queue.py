"""The SQL API's transitions, each through the Python client, on real Postgres."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg
import pytest

from gpuq.client import Client, InstanceClient, InvalidRequest, Job, Listener, NotHeld
from gpuq.settings import Settings
from tests.conftest import enroll


def token(job: Job) -> UUID:
    """The claim's lease token, which every report presents."""
    assert job.lease_token is not None
    return job.lease_token


def test_enqueue_claim_complete_records_result_and_history(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {"text": "hola"})
    [job] = instance.claim(["q"], 5)
    assert (job.id, job.attempt, job.status, job.instance_id) == (job_id, 1, "running", instance.instance_id)
    assert job.lease_expires_at is not None and job.lease_expires_at > datetime.now(UTC)

    instance.progress(job_id, token(job), 30, "loading")
    assert (client.get(job_id).progress, client.get(job_id).progress_message) == (30, "loading")
    instance.complete(job_id, token(job), {"outputs": ["file:///x.wav"]})

    done = client.get(job_id)
    assert done.status == "succeeded" and done.result == {"outputs": ["file:///x.wav"]}
    assert done.finished_at is not None and done.lease_expires_at is None
    [event] = client.history(job_id)
    assert (event["event"], event["attempt"], event["instance_id"]) == ("succeeded", 1, instance.instance_id)
    assert event["run_seconds"] >= 0


def test_every_claim_issues_a_new_random_lease_token(client: Client, instance: InstanceClient) -> None:
    ids = [client.enqueue("q", {}) for _ in range(3)]
    jobs = instance.claim(["q"], 3)
    tokens = {token(j) for j in jobs}
    assert len(tokens) == 3 and all(t.version == 4 for t in tokens)
    instance.release([(j.id, token(j)) for j in jobs])
    again = instance.claim(["q"], 3)
    assert {j.id for j in again} == set(ids) and tokens.isdisjoint(token(j) for j in again)


def test_claim_respects_priority_then_age_and_limit(client: Client, instance: InstanceClient) -> None:
    low = client.enqueue("q", {}, priority=-5)
    first = client.enqueue("q", {})
    urgent = client.enqueue("q", {}, priority=10)
    second = client.enqueue("q", {})
    claimed = instance.claim(["q"], 3)
    assert [j.id for j in claimed] == [urgent, first, second]
    assert [j.id for j in instance.claim(["q"], 3)] == [low]
    assert instance.claim(["q"], 3) == []


def test_claim_routes_by_queue_and_vram(client: Client) -> None:
    mid = enroll(client, ("img", "tts"), vram_mb=24000)
    big_gpu = enroll(client, ("img",), vram_mb=80000)
    tts = client.enqueue("tts", {})
    big = client.enqueue("img", {}, min_vram_mb=48000)
    small = client.enqueue("img", {}, min_vram_mb=8000)
    assert [j.id for j in mid.claim(["img"], 10)] == [small]
    assert [j.id for j in mid.claim(["tts"], 10)] == [tts]
    assert [j.id for j in big_gpu.claim(["img"], 10)] == [big]


def test_claim_serves_the_instances_queues_in_the_order_asked(client: Client) -> None:
    inst = enroll(client, ("a", "b"))
    b = client.enqueue("b", {}, priority=50)
    a = client.enqueue("a", {})
    c = client.enqueue("c", {}, priority=100)
    assert [j.id for j in inst.claim(["c", "a", "b"], 1)] == [a]  # c is not this instance's; a before b
    assert [j.id for j in inst.claim(["c", "b", "a"], 1)] == [b]
    x = client.enqueue("a", {})
    client.enqueue("b", {}, priority=100)
    assert [j.id for j in inst.claim(None, 1)] == [x]  # None: all it serves, in its own order
    assert client.get(c).status == "queued"


def test_claim_takes_at_most_the_free_capacity(client: Client) -> None:
    inst = enroll(client, ("q",), concurrency=2)
    for _ in range(5):
        client.enqueue("q", {})
    first = inst.claim(["q"], 10)
    assert len(first) == 2
    assert inst.claim(["q"], 10) == []  # full
    inst.complete(first[0].id, token(first[0]))
    assert len(inst.claim(["q"], 10)) == 1  # one slot freed


def test_scheduled_job_waits_for_run_after(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {}, run_after=datetime.now(UTC) + timedelta(seconds=1.5))
    assert instance.claim(["q"], 1) == []
    [stats] = client.queue_stats()
    assert (stats["queued"], stats["scheduled"]) == (0, 1)
    time.sleep(1.6)
    assert [j.id for j in instance.claim(["q"], 1)] == [job_id]


def test_retryable_failure_backs_off_then_fails_after_max_attempts(
    client: Client, instance: InstanceClient
) -> None:
    client.conn.execute("update gpuq.config set retry_base_seconds = 0.4")
    job_id = client.enqueue("q", {}, max_attempts=2)
    [job] = instance.claim(["q"], 1)
    before = datetime.now(UTC)
    assert (
        instance.fail(job_id, token(job), "GPU_OOM", "CUDA out of memory", details={"traceback": "tb"})
        == "queued"
    )
    queued = client.get(job_id)
    # first retry waits between base/2 and base
    assert timedelta(seconds=0.19) <= queued.run_after - before <= timedelta(seconds=0.45)
    assert queued.error_code == "GPU_OOM" and queued.instance_id is None
    assert instance.claim(["q"], 1) == []  # not before its backoff

    time.sleep(0.5)
    [again] = instance.claim(["q"], 1)
    assert again.attempt == 2
    assert instance.fail(job_id, token(again), "GPU_OOM", "CUDA out of memory") == "failed"
    failed = client.get(job_id)
    assert failed.status == "failed" and failed.finished_at is not None
    events = [e["event"] for e in client.history(job_id)]
    assert events == ["retry_scheduled", "failed"]
    assert client.history(job_id)[0]["details"] == {"traceback": "tb"}
    assert "tb" not in str(failed.result)


def test_second_retry_waits_longer(client: Client) -> None:
    client.conn.execute("update gpuq.config set retry_base_seconds = 100")
    delays = []
    for n in (1, 2, 3):
        delay = client.conn.execute("select extract(epoch from gpuq.retry_delay(%s)) as s", (n,)).fetchone()
        assert delay is not None
        delays.append(float(delay["s"]))
    assert 50 <= delays[0] <= 100 and 100 <= delays[1] <= 200 and 200 <= delays[2] <= 400
    client.conn.execute("update gpuq.config set retry_max_seconds = 150")
    capped = client.conn.execute("select extract(epoch from gpuq.retry_delay(10)) as s").fetchone()
    assert capped is not None and 75 <= float(capped["s"]) <= 150


def test_non_retryable_failure_fails_at_once(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {}, max_attempts=5)
    [job] = instance.claim(["q"], 1)
    assert instance.fail(job_id, token(job), "INPUT_INVALID", "text is empty") == "failed"
    job = client.get(job_id)
    assert (job.status, job.error_code, job.error_message) == ("failed", "INPUT_INVALID", "text is empty")


def test_reports_with_a_nul_land_with_a_replacement_character(
    client: Client, instance: InstanceClient
) -> None:
    """Postgres text cannot hold U+0000 nor jsonb the \\u0000 escape. A worker's report carrying one (an
    error read from a binary file, a ComfyUI traceback) must still land, or its job stays running."""
    failing = client.enqueue("q", {}, max_attempts=1)
    done, done_too = client.enqueue("q", {}), client.enqueue("q", {})
    jobs = {j.id: j for j in instance.claim(["q"], 3)}

    instance.progress(done, token(jobs[done]), 50, "step\x00two")
    assert client.get(done).progress_message == "step\ufffdtwo"
    held = [(j.id, token(j)) for j in jobs.values()]
    instance.heartbeat(held, {"gpu_name": "RTX\x00", "temps": [40, "hot\x00"]})
    metrics = client.conn.execute(
        "select metrics from gpuq.instances where id = %s", (instance.instance_id,)
    ).fetchone()
    assert metrics == {"metrics": {"gpu_name": "RTX\ufffd", "temps": [40, "hot\ufffd"]}}

    details = {"traceback": ["line 1", "ValueError: \x00\x00"], "node\x00": {"id": "7\x00"}}
    status = instance.fail(
        failing, token(jobs[failing]), "BACKEND_ERROR", "bad byte \x00 in input", details=details
    )
    assert status == "failed"
    job = client.get(failing)
    assert (job.status, job.error_message) == ("failed", "bad byte \ufffd in input")
    [event] = client.history(failing)
    assert event["message"] == "bad byte \ufffd in input"
    assert event["details"] == {
        "traceback": ["line 1", "ValueError: \ufffd\ufffd"],
        "node\ufffd": {"id": "7\ufffd"},
    }

    instance.complete(done, token(jobs[done]), {"outputs": [{"name": "a\x00.png"}], "note\x00": "b\x00"})
    assert client.get(done).result == {"outputs": [{"name": "a\ufffd.png"}], "note\ufffd": "b\ufffd"}
    assert instance.complete_many([(done_too, token(jobs[done_too]), {"metrics": {"log": "x\x00"}})]) == []
    assert client.get(done_too).result == {"metrics": {"log": "x\ufffd"}}


def test_unknown_error_code_is_refused_and_changes_nothing(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {})
    [job] = instance.claim(["q"], 1)
    with pytest.raises(InvalidRequest, match="unknown error code 'OOPS'"):
        instance.fail(job_id, token(job), "OOPS", "?")
    assert client.get(job_id).status == "running"


def test_cancel_queued_job_ends_at_once(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {})
    assert client.cancel(job_id) == "cancelled"
    assert client.get(job_id).error_code == "CANCELLED"
    assert instance.claim(["q"], 1) == []
    assert client.cancel(job_id) == "cancelled"  # again: no change, no error


def test_cancel_running_job_goes_through_heartbeat(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {})
    [job] = instance.claim(["q"], 1)
    assert client.cancel(job_id) == "running"
    reply = instance.heartbeat([(job_id, token(job))])
    assert reply.cancel == [(job_id, token(job))] and reply.lost == []
    # the worker stops the job and reports it; whatever code it gives, the job ends cancelled
    assert instance.fail(job_id, token(job), "CANCELLED", "stopped on request") == "cancelled"
    assert client.get(job_id).status == "cancelled"
    assert [e["event"] for e in client.history(job_id)] == ["cancel_requested", "cancelled"]


def test_release_returns_jobs_without_using_an_attempt(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {}, max_attempts=1)
    [job] = instance.claim(["q"], 1)
    assert instance.release([(job_id, token(job))]) == 1
    released = client.get(job_id)
    assert (released.status, released.attempt, released.releases, released.instance_id) == (
        "queued",
        1,
        1,
        None,
    )
    assert released.lease_token is None
    # the only attempt was not used up: it runs again, and a failure now is its real first attempt
    other = enroll(client)
    [again] = other.claim(["q"], 1)
    assert again.attempt == 2
    with pytest.raises(NotHeld):
        instance.complete(job_id, token(job))  # the released attempt cannot complete it
    assert other.fail(job_id, token(again), "GPU_OOM", "oom") == "failed"  # max_attempts=1: that was the one


def test_a_job_handed_back_keeps_its_place_in_line(client: Client, instance: InstanceClient) -> None:
    """Released or expired, a job goes back to where it was, not behind the whole backlog."""
    first = client.enqueue("q", {})
    [job] = instance.claim(["q"], 1)
    backlog = [client.enqueue("q", {}) for _ in range(5)]
    instance.release([(first, token(job))])
    assert instance.claim(["q"], 1)[0].id == first
    expired = instance.claim(["q"], 1, lease_seconds=1)[0]
    assert expired.id == backlog[0]
    time.sleep(1.2)
    other = enroll(client)
    assert other.claim(["q"], 1)[0].id == expired.id  # its lease passed: first in line again


def test_idempotency_key_dedupes_live_jobs_only(client: Client, instance: InstanceClient) -> None:
    first = client.enqueue("q", {"n": 1}, idempotency_key="order-7")
    assert client.enqueue("q", {"n": 2}, idempotency_key="order-7") == first
    with pytest.raises(psycopg.errors.UniqueViolation, match="jobs_live_idempotency_key"):
        client.conn.execute("insert into gpuq.jobs (queue, idempotency_key) values ('q', 'order-7')")
    [job] = instance.claim(["q"], 1)
    assert client.enqueue("q", {}, idempotency_key="order-7") == first  # running is live too
    instance.complete(first, token(job))
    assert client.enqueue("q", {}, idempotency_key="order-7") != first  # finished: a new job


def test_fencing_rejects_the_old_token_after_lease_expiry(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {})
    [old] = instance.claim(["q"], 1, lease_seconds=1)
    time.sleep(1.2)
    other = enroll(client)
    [taken] = other.claim(["q"], 1)
    assert (taken.id, taken.attempt) == (job_id, 2)
    with pytest.raises(NotHeld, match=f"job {job_id} is not held by this instance under that lease token"):
        instance.complete(job_id, token(old), {"late": True})
    with pytest.raises(NotHeld):
        instance.progress(job_id, token(old), 50)
    with pytest.raises(NotHeld):
        instance.fail(job_id, token(old), "GPU_OOM", "late")
    assert instance.heartbeat([(job_id, token(old))]).lost == [(job_id, token(old))]
    other.complete(job_id, token(taken), {"ok": True})
    assert client.get(job_id).result == {"ok": True}
    assert [e["event"] for e in client.history(job_id)] == ["lease_expired", "succeeded"]


def test_complete_and_fail_again_after_a_lost_reply_are_recognised(
    client: Client, instance: InstanceClient
) -> None:
    """A worker that retries a complete or fail whose commit reply it never saw gets the same answer."""
    done, failed = client.enqueue("q", {}), client.enqueue("q", {}, max_attempts=1)
    jobs = {j.id: j for j in instance.claim(["q"], 2)}
    instance.complete(done, token(jobs[done]), {"n": 1})
    instance.complete(done, token(jobs[done]), {"n": 2})  # the retry: accepted, changes nothing
    assert instance.complete_many([(done, token(jobs[done]), {"n": 3})]) == []
    assert client.get(done).result == {"n": 1}
    assert instance.fail(failed, token(jobs[failed]), "BACKEND_ERROR", "boom") == "failed"
    assert instance.fail(failed, token(jobs[failed]), "BACKEND_ERROR", "boom") == "failed"
    assert [e["event"] for e in client.history(failed)] == ["failed"]  # recorded once


def test_heartbeat_extends_lease_and_reports_timeout(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {}, timeout_seconds=1)
    [job] = instance.claim(["q"], 1, lease_seconds=5)
    first_lease = client.get(job_id).lease_expires_at
    time.sleep(0.3)
    assert instance.heartbeat([(job_id, token(job))], {"gpu_util": 40}, lease_seconds=5).timeout == []
    lease = client.get(job_id).lease_expires_at
    assert first_lease is not None and lease is not None and lease > first_lease
    time.sleep(0.9)
    reply = instance.heartbeat([(job_id, token(job))], lease_seconds=5)
    assert reply.timeout == [(job_id, token(job))]
    assert instance.fail(job_id, token(job), "TIMEOUT", "ran past 1 s") == "queued"


def test_expired_lease_with_no_attempt_left_fails(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {}, max_attempts=1)
    instance.claim(["q"], 1, lease_seconds=1)
    time.sleep(1.2)
    assert instance.claim(["q"], 1) == []
    job = client.get(job_id)
    assert (job.status, job.error_code) == ("failed", "LEASE_EXPIRED")


def test_reap_requeues_expired_leases(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {})
    instance.claim(["q"], 1, lease_seconds=1)
    time.sleep(1.2)
    assert client.reap_expired() == 1
    job = client.get(job_id)
    assert (job.status, job.instance_id, job.attempt, job.lease_token) == ("queued", None, 1, None)
    assert client.queue_stats()[0]["queued"] == 1
    [event] = client.history(job_id)
    assert (event["event"], event["instance_id"], event["error_code"]) == (
        "lease_expired",
        instance.instance_id,
        "LEASE_EXPIRED",
    )


def test_heartbeat_tells_a_draining_instance(client: Client, instance: InstanceClient) -> None:
    assert instance.heartbeat().drain is False
    assert instance.instance_id is not None
    client.drain_instance(instance.instance_id, "spot notice")
    assert instance.heartbeat().drain is True
    assert instance.claim(["q"], 1) == []  # a draining instance claims nothing


def test_deregister_releases_held_jobs_and_ends_the_secret(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {})
    instance.claim(["q"], 1)
    assert instance.deregister("sigterm") == 1
    assert client.get(job_id).status == "queued"
    row = client.conn.execute(
        "select status, end_reason, secret_sha256 from gpuq.instances where id = %s", (instance.instance_id,)
    ).fetchone()
    assert row == {"status": "terminated", "end_reason": "sigterm", "secret_sha256": None}


def test_retry_of_failed_job_allows_one_more_attempt(client: Client, instance: InstanceClient) -> None:
    job_id = client.enqueue("q", {}, max_attempts=1)
    [job] = instance.claim(["q"], 1)
    instance.fail(job_id, token(job), "BACKEND_ERROR", "boom")
    client.retry(job_id)
    job = client.get(job_id)
    assert (job.status, job.max_attempts, job.finished_at) == ("queued", 2, None)
    [again] = instance.claim(["q"], 1)
    assert again.attempt == 2
    with pytest.raises(InvalidRequest, match="only failed or cancelled jobs can be retried"):
        client.retry(job_id)


def test_prune_deletes_old_finished_jobs_and_keeps_the_rest(client: Client, instance: InstanceClient) -> None:
    done = [client.enqueue("q", {}) for _ in range(5)]
    for job in instance.claim(["q"], 5):
        instance.complete(job.id, token(job))
    live = client.enqueue("q", {})
    time.sleep(0.3)
    assert client.prune(older_than_seconds=3600) == 0
    assert client.prune(older_than_seconds=0.1, batch=2) == 5
    assert [j.id for j in client.list_jobs()] == [live]
    left = client.conn.execute("select count(*) as n from gpuq.job_events where job_id = any(%s)", (done,))
    assert left.fetchone() == {"n": 0}


def test_notify_once_per_insert_statement_and_on_finish(
    client: Client, instance: InstanceClient, settings: Settings
) -> None:
    listener = Listener(client.url, settings, ["gpuq_jobs", "gpuq_done"])
    listener.start()
    try:
        client.conn.execute("insert into gpuq.jobs (queue) select 'q' from generate_series(1, 50)")
        got = listener.wait(2)
        assert [(n.channel, n.payload) for n in got] == [("gpuq_jobs", "q")]
        [job] = instance.claim(["q"], 1)
        instance.complete(job.id, token(job))
        got = listener.wait(2)
        assert [n.channel for n in got] == ["gpuq_done"]
        assert f'"id" : {job.id}' in got[0].payload and '"succeeded"' in got[0].payload
    finally:
        listener.close()


def test_wait_returns_when_another_connection_finishes_the_job(
    client: Client, instance: InstanceClient, settings: Settings
) -> None:
    job_id = client.enqueue("q", {})
    worker = Client.connect(client.url, settings).as_instance(instance.secret)
    seen: list[int | None] = []

    def finish() -> None:
        time.sleep(0.2)
        [job] = worker.claim(["q"], 1)
        worker.progress(job.id, token(job), 50, "half")
        time.sleep(0.2)
        worker.complete(job.id, token(job), {"ok": 1})

    thread = threading.Thread(target=finish)
    thread.start()
    done = client.wait(job_id, timeout=10, on_progress=lambda j: seen.append(j.progress))
    thread.join()
    worker.client.close()
    assert done.status == "succeeded" and done.result == {"ok": 1}
    assert 50 in seen


def test_stats_report_depth_outcomes_and_failures(client: Client) -> None:
    paid = enroll(client, ("q",), provider="vast", gpu_name="RTX 4090")
    for _ in range(3):
        client.enqueue("q", {})
    client.enqueue("other", {})
    [a, b] = paid.claim(["q"], 2)
    paid.complete(a.id, token(a))
    paid.fail(b.id, token(b), "INPUT_INVALID", "bad image")
    stats = {s["queue"]: s for s in client.queue_stats()}
    assert (stats["q"]["queued"], stats["q"]["succeeded_1h"], stats["q"]["failed_1h"]) == (1, 1, 1)
    assert stats["other"]["queued"] == 1 and stats["q"]["run_p50"] is not None
    assert stats["q"]["wait_p50"] is not None and stats["other"]["oldest_wait"] is not None
    [failure] = client.failure_stats()
    assert (failure["error_code"], failure["failed"], failure["last_message"]) == (
        "INPUT_INVALID",
        1,
        "bad image",
    )
    [vast] = client.instance_stats()
    assert vast["provider"] == "vast" and (vast["live"], vast["busy"]) == (1, 1)


def test_instance_stats_spend_today_is_price_times_hours_rented_today(client: Client) -> None:
    # An instance rented 2 hours ago at $0.50/h (the manager records rents; seeded here directly).
    client.conn.execute(
        """insert into gpuq.instances (provider, provider_instance_id, status, dph, created_at)
           values ('vast', 'c-9', 'busy', 0.5, now() - interval '2 hours')"""
    )
    row = client.conn.execute(
        "select now() - date_trunc('day', now() at time zone 'UTC') at time zone 'UTC' as d"
    )
    since_midnight = row.fetchone()["d"]  # type: ignore[index]
    hours_today = min(2.0, since_midnight.total_seconds() / 3600)
    [vast] = client.instance_stats()
    assert float(vast["dph_now"]) == 0.5
    assert float(vast["spend_today_usd"]) == pytest.approx(0.5 * hours_today, abs=0.001)
