"""The SQL API's transitions, each through the Python client, on real Postgres."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from gpuq.client import Client, InvalidRequest, JobNotFound, Listener, NotHeld
from gpuq.settings import Settings


def test_enqueue_claim_complete_records_result_and_history(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {"text": "hola"})
    [job] = client.claim(instance, ["q"], 5)
    assert (job.id, job.attempt, job.status, job.instance_id) == (job_id, 1, "running", instance)
    assert job.lease_expires_at is not None and job.lease_expires_at > datetime.now(UTC)

    client.progress(job_id, 1, 30, "loading")
    assert (client.get(job_id).progress, client.get(job_id).progress_message) == (30, "loading")
    client.complete(job_id, 1, {"outputs": ["file:///x.wav"]})

    done = client.get(job_id)
    assert done.status == "succeeded" and done.result == {"outputs": ["file:///x.wav"]}
    assert done.finished_at is not None and done.lease_expires_at is None
    [event] = client.history(job_id)
    assert (event["event"], event["attempt"], event["instance_id"]) == ("succeeded", 1, instance)
    assert event["run_seconds"] >= 0


def test_claim_respects_priority_then_age_and_limit(client: Client, instance: int) -> None:
    low = client.enqueue("q", {}, priority=-5)
    first = client.enqueue("q", {})
    urgent = client.enqueue("q", {}, priority=10)
    second = client.enqueue("q", {})
    claimed = client.claim(instance, ["q"], 3)
    assert [j.id for j in claimed] == [urgent, first, second]
    assert [j.id for j in client.claim(instance, ["q"], 3)] == [low]
    assert client.claim(instance, ["q"], 3) == []


def test_claim_routes_by_queue_and_vram(client: Client, instance: int) -> None:
    tts = client.enqueue("tts", {})
    big = client.enqueue("img", {}, min_vram_mb=48000)
    small = client.enqueue("img", {}, min_vram_mb=8000)
    assert [j.id for j in client.claim(instance, ["img"], 10, vram_mb=24000)] == [small]
    assert [j.id for j in client.claim(instance, ["tts"], 10, vram_mb=24000)] == [tts]
    assert [j.id for j in client.claim(instance, ["img"], 10, vram_mb=80000)] == [big]


def test_scheduled_job_waits_for_run_after(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {}, run_after=datetime.now(UTC) + timedelta(seconds=1.5))
    assert client.claim(instance, ["q"], 1) == []
    [stats] = client.queue_stats()
    assert (stats["queued"], stats["scheduled"]) == (0, 1)
    time.sleep(1.6)
    assert [j.id for j in client.claim(instance, ["q"], 1)] == [job_id]


def test_retryable_failure_backs_off_then_fails_after_max_attempts(client: Client, instance: int) -> None:
    client.conn.execute("set gpuq.retry_base_seconds = 0.4")
    job_id = client.enqueue("q", {}, max_attempts=2)
    client.claim(instance, ["q"], 1)
    before = datetime.now(UTC)
    assert client.fail(job_id, 1, "GPU_OOM", "CUDA out of memory", details={"traceback": "tb"}) == "queued"
    queued = client.get(job_id)
    # first retry waits between base/2 and base
    assert timedelta(seconds=0.19) <= queued.run_after - before <= timedelta(seconds=0.45)
    assert queued.error_code == "GPU_OOM" and queued.instance_id is None
    assert client.claim(instance, ["q"], 1) == []  # not before its backoff

    time.sleep(0.5)
    [again] = client.claim(instance, ["q"], 1)
    assert again.attempt == 2
    assert client.fail(job_id, 2, "GPU_OOM", "CUDA out of memory") == "failed"
    failed = client.get(job_id)
    assert failed.status == "failed" and failed.finished_at is not None
    events = [e["event"] for e in client.history(job_id)]
    assert events == ["retry_scheduled", "failed"]
    assert client.history(job_id)[0]["details"] == {"traceback": "tb"}
    assert "tb" not in str(failed.result)


def test_second_retry_waits_longer(client: Client, instance: int) -> None:
    client.conn.execute("set gpuq.retry_base_seconds = 100")
    delays = []
    for n in (1, 2, 3):
        delay = client.conn.execute("select extract(epoch from gpuq.retry_delay(%s)) as s", (n,)).fetchone()
        assert delay is not None
        delays.append(float(delay["s"]))
    assert 50 <= delays[0] <= 100 and 100 <= delays[1] <= 200 and 200 <= delays[2] <= 400
    client.conn.execute("set gpuq.retry_max_seconds = 150")
    capped = client.conn.execute("select extract(epoch from gpuq.retry_delay(10)) as s").fetchone()
    assert capped is not None and 75 <= float(capped["s"]) <= 150


def test_non_retryable_failure_fails_at_once(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {}, max_attempts=5)
    client.claim(instance, ["q"], 1)
    assert client.fail(job_id, 1, "INPUT_INVALID", "text is empty") == "failed"
    job = client.get(job_id)
    assert (job.status, job.error_code, job.error_message) == ("failed", "INPUT_INVALID", "text is empty")


def test_reports_with_a_nul_land_with_a_replacement_character(client: Client, instance: int) -> None:
    """Postgres text cannot hold U+0000 nor jsonb the \\u0000 escape. A worker's report carrying one (an
    error read from a binary file, a ComfyUI traceback) must still land, or its job stays running."""
    failing = client.enqueue("q", {}, max_attempts=1)
    done, done_too = client.enqueue("q", {}), client.enqueue("q", {})
    client.claim(instance, ["q"], 3)

    client.progress(done, 1, 50, "step\x00two")
    assert client.get(done).progress_message == "step\ufffdtwo"
    client.heartbeat(instance, [(done, 1)], {"gpu_name": "RTX\x00", "temps": [40, "hot\x00"]})
    metrics = client.conn.execute("select metrics from gpuq.instances where id = %s", (instance,)).fetchone()
    assert metrics == {"metrics": {"gpu_name": "RTX\ufffd", "temps": [40, "hot\ufffd"]}}

    details = {"traceback": ["line 1", "ValueError: \x00\x00"], "node\x00": {"id": "7\x00"}}
    assert client.fail(failing, 1, "BACKEND_ERROR", "bad byte \x00 in input", details=details) == "failed"
    job = client.get(failing)
    assert (job.status, job.error_message) == ("failed", "bad byte \ufffd in input")
    [event] = client.history(failing)
    assert event["message"] == "bad byte \ufffd in input"
    assert event["details"] == {
        "traceback": ["line 1", "ValueError: \ufffd\ufffd"],
        "node\ufffd": {"id": "7\ufffd"},
    }

    client.complete(done, 1, {"outputs": [{"name": "a\x00.png"}], "note\x00": "b\x00"})
    assert client.get(done).result == {"outputs": [{"name": "a\ufffd.png"}], "note\ufffd": "b\ufffd"}
    assert client.complete_many([(done_too, 1, {"metrics": {"log": "x\x00"}})]) == []
    assert client.get(done_too).result == {"metrics": {"log": "x\ufffd"}}


def test_unknown_error_code_is_refused_and_changes_nothing(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {})
    client.claim(instance, ["q"], 1)
    with pytest.raises(InvalidRequest, match="unknown error code 'OOPS'"):
        client.fail(job_id, 1, "OOPS", "?")
    assert client.get(job_id).status == "running"


def test_cancel_queued_job_ends_at_once(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {})
    assert client.cancel(job_id) == "cancelled"
    assert client.get(job_id).error_code == "CANCELLED"
    assert client.claim(instance, ["q"], 1) == []
    assert client.cancel(job_id) == "cancelled"  # again: no change, no error


def test_cancel_running_job_goes_through_heartbeat(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {})
    client.claim(instance, ["q"], 1)
    assert client.cancel(job_id) == "running"
    reply = client.heartbeat(instance, [(job_id, 1)])
    assert reply.cancel == [(job_id, 1)] and reply.lost == []
    # the worker stops the job and reports it; whatever code it gives, the job ends cancelled
    assert client.fail(job_id, 1, "CANCELLED", "stopped on request") == "cancelled"
    assert client.get(job_id).status == "cancelled"
    assert [e["event"] for e in client.history(job_id)] == ["cancel_requested", "cancelled"]


def test_release_returns_jobs_without_using_an_attempt(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {}, max_attempts=1)
    client.claim(instance, ["q"], 1)
    assert client.release(instance) == 1
    job = client.get(job_id)
    assert (job.status, job.attempt, job.releases, job.instance_id) == ("queued", 1, 1, None)
    # the only attempt was not used up: it runs again, and a failure now is its real first attempt
    other = client.register_instance("manual", None, queues=["q"])
    [again] = client.claim(other, ["q"], 1)
    assert again.attempt == 2
    with pytest.raises(NotHeld):
        client.complete(job_id, 1)  # the released attempt cannot complete it
    assert client.fail(job_id, 2, "GPU_OOM", "oom") == "failed"  # max_attempts=1: that was the one


def test_idempotency_key_dedupes_live_jobs_only(client: Client, instance: int) -> None:
    first = client.enqueue("q", {"n": 1}, idempotency_key="order-7")
    assert client.enqueue("q", {"n": 2}, idempotency_key="order-7") == first
    with pytest.raises(psycopg.errors.UniqueViolation, match="jobs_live_idempotency_key"):
        client.conn.execute("insert into gpuq.jobs (queue, idempotency_key) values ('q', 'order-7')")
    client.claim(instance, ["q"], 1)
    assert client.enqueue("q", {}, idempotency_key="order-7") == first  # running is live too
    client.complete(first, 1)
    assert client.enqueue("q", {}, idempotency_key="order-7") != first  # finished: a new job


def test_fencing_rejects_stale_attempt_after_lease_expiry(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {})
    client.claim(instance, ["q"], 1, lease_seconds=1)
    time.sleep(1.2)
    other = client.register_instance("manual", None, queues=["q"])
    [taken] = client.claim(other, ["q"], 1)
    assert (taken.id, taken.attempt) == (job_id, 2)
    with pytest.raises(NotHeld, match="attempt 1 is no longer held"):
        client.complete(job_id, 1, {"late": True})
    with pytest.raises(NotHeld):
        client.progress(job_id, 1, 50)
    with pytest.raises(NotHeld):
        client.fail(job_id, 1, "GPU_OOM", "late")
    assert client.heartbeat(instance, [(job_id, 1)]).lost == [(job_id, 1)]
    client.complete(job_id, 2, {"ok": True})
    assert client.get(job_id).result == {"ok": True}
    assert [e["event"] for e in client.history(job_id)] == ["lease_expired", "succeeded"]


def test_heartbeat_extends_lease_and_reports_timeout(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {}, timeout_seconds=1)
    client.claim(instance, ["q"], 1, lease_seconds=5)
    first_lease = client.get(job_id).lease_expires_at
    time.sleep(0.3)
    assert client.heartbeat(instance, [(job_id, 1)], {"gpu_util": 40}, lease_seconds=5).timeout == []
    lease = client.get(job_id).lease_expires_at
    assert first_lease is not None and lease is not None and lease > first_lease
    time.sleep(0.9)
    reply = client.heartbeat(instance, [(job_id, 1)], lease_seconds=5)
    assert reply.timeout == [(job_id, 1)]
    assert client.get(job_id).lease_expires_at == lease  # a timed-out job's lease is not extended
    assert client.fail(job_id, 1, "TIMEOUT", "ran past 1 s") == "queued"


def test_expired_lease_with_no_attempt_left_fails(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {}, max_attempts=1)
    client.claim(instance, ["q"], 1, lease_seconds=1)
    time.sleep(1.2)
    assert client.claim(instance, ["q"], 1) == []
    job = client.get(job_id)
    assert (job.status, job.error_code) == ("failed", "LEASE_EXPIRED")


def test_reap_requeues_expired_leases(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {})
    client.claim(instance, ["q"], 1, lease_seconds=1)
    time.sleep(1.2)
    assert client.reap_expired() == 1
    job = client.get(job_id)
    assert (job.status, job.instance_id, job.attempt) == ("queued", None, 1)
    assert client.queue_stats()[0]["queued"] == 1
    [event] = client.history(job_id)
    assert (event["event"], event["instance_id"], event["error_code"]) == (
        "lease_expired",
        instance,
        "LEASE_EXPIRED",
    )


def test_heartbeat_tells_a_draining_or_terminated_instance(client: Client, instance: int) -> None:
    assert client.heartbeat(instance).drain is False
    client.drain_instance(instance, "spot notice")
    assert client.heartbeat(instance).drain is True
    client.deregister_instance(instance, "drained")
    assert client.heartbeat(instance).shutdown is True
    with pytest.raises(JobNotFound, match="instance 999 does not exist"):
        client.heartbeat(999)


def test_deregister_releases_held_jobs(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {})
    client.claim(instance, ["q"], 1)
    assert client.deregister_instance(instance, "sigterm") == 1
    assert client.get(job_id).status == "queued"
    row = client.conn.execute(
        "select status, end_reason from gpuq.instances where id = %s", (instance,)
    ).fetchone()
    assert row == {"status": "terminated", "end_reason": "sigterm"}


def test_retry_of_failed_job_allows_one_more_attempt(client: Client, instance: int) -> None:
    job_id = client.enqueue("q", {}, max_attempts=1)
    client.claim(instance, ["q"], 1)
    client.fail(job_id, 1, "BACKEND_ERROR", "boom")
    client.retry(job_id)
    job = client.get(job_id)
    assert (job.status, job.max_attempts, job.finished_at) == ("queued", 2, None)
    [again] = client.claim(instance, ["q"], 1)
    assert again.attempt == 2
    with pytest.raises(InvalidRequest, match="only failed or cancelled jobs can be retried"):
        client.retry(job_id)


def test_prune_deletes_old_finished_jobs_and_keeps_the_rest(client: Client, instance: int) -> None:
    done = [client.enqueue("q", {}) for _ in range(5)]
    for job in client.claim(instance, ["q"], 5):
        client.complete(job.id, job.attempt)
    live = client.enqueue("q", {})
    time.sleep(0.3)
    assert client.prune(older_than_seconds=3600) == 0
    assert client.prune(older_than_seconds=0.1, batch=2) == 5
    assert [j.id for j in client.list_jobs()] == [live]
    left = client.conn.execute("select count(*) as n from gpuq.job_events where job_id = any(%s)", (done,))
    assert left.fetchone() == {"n": 0}


def test_notify_once_per_insert_statement_and_on_finish(
    client: Client, instance: int, settings: Settings
) -> None:
    listener = Listener(client.url, settings, ["gpuq_jobs", "gpuq_done"])
    listener.start()
    try:
        client.conn.execute("insert into gpuq.jobs (queue) select 'q' from generate_series(1, 50)")
        got = listener.wait(2)
        assert [(n.channel, n.payload) for n in got] == [("gpuq_jobs", "q")]
        [job] = client.claim(instance, ["q"], 1)
        client.complete(job.id, 1)
        got = listener.wait(2)
        assert [n.channel for n in got] == ["gpuq_done"]
        assert f'"id" : {job.id}' in got[0].payload and '"succeeded"' in got[0].payload
    finally:
        listener.close()


def test_wait_returns_when_another_connection_finishes_the_job(
    client: Client, instance: int, settings: Settings
) -> None:
    import threading

    job_id = client.enqueue("q", {})
    worker = Client.connect(client.url, settings)
    seen: list[int | None] = []

    def finish() -> None:
        time.sleep(0.2)
        [job] = worker.claim(instance, ["q"], 1)
        worker.progress(job.id, job.attempt, 50, "half")
        time.sleep(0.2)
        worker.complete(job.id, job.attempt, {"ok": 1})

    thread = threading.Thread(target=finish)
    thread.start()
    done = client.wait(job_id, timeout=10, on_progress=lambda j: seen.append(j.progress))
    thread.join()
    worker.close()
    assert done.status == "succeeded" and done.result == {"ok": 1}
    assert 50 in seen


def test_stats_report_depth_outcomes_and_failures(client: Client) -> None:
    paid = client.register_instance("vast", "c-1", gpu_name="RTX 4090", queues=["q"])
    for _ in range(3):
        client.enqueue("q", {})
    client.enqueue("other", {})
    [a, b] = client.claim(paid, ["q"], 2)
    client.complete(a.id, a.attempt)
    client.fail(b.id, b.attempt, "INPUT_INVALID", "bad image")
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
