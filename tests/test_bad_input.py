"""Bad input through a plain INSERT and through the functions: a clear error, nothing half-written."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import psycopg
import pytest

from gpuq.client import Client, InstanceClient, InvalidRequest, JobNotFound, NotHeld


def job_count(client: Client) -> int:
    row = client.conn.execute("select count(*) as n from gpuq.jobs").fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.parametrize(
    ("columns", "values", "message"),
    [
        ("queue", "'Bad Queue!'", "queue_must_be_a_lowercase_name"),
        ("queue", "''", "queue_must_be_a_lowercase_name"),
        ("queue, payload", "'q', '\"just a string\"'", "payload_must_be_a_json_object"),
        ("queue, payload", "'q', '[1, 2]'", "payload_must_be_a_json_object"),
        ("queue, payload", "'q', '{not json'", "invalid input syntax for type json"),
        ("queue, payload", "'q', null", 'null value in column "payload"'),
        ("queue, priority", "'q', 5000", "priority_must_be_between_minus_100_and_100"),
        ("queue, priority", "'q', 99999999", "smallint out of range"),
        ("queue, max_attempts", "'q', 0", "max_attempts_must_be_between_1_and_100"),
        ("queue, timeout_seconds", "'q', -1", "timeout_seconds_must_be_between_1_and_604800"),
        ("queue, min_vram_mb", "'q', -5", "min_vram_mb_must_be_between_0_and_1048576"),
        ("queue, status", "'q', 'succeeded'", "a new job must start queued and clean"),
        ("queue, attempt", "'q', 3", "a new job must start queued and clean"),
        ("queue, result", "'q', '{}'", "a new job must start queued and clean"),
    ],
)
def test_plain_insert_rejects_bad_rows_clearly(
    client: Client, columns: str, values: str, message: str
) -> None:
    client.enqueue("q", {"fine": True})
    with pytest.raises(psycopg.Error, match=message):
        client.conn.execute(f"insert into gpuq.jobs ({columns}) values ({values})")
    assert job_count(client) == 1


QUEUE_NAMES = [
    "q",
    "9",
    "a_b.c-d",
    "0-x",
    "a" * 63,
    "a" * 64,
    "",
    "_a",
    ".a",
    "-a",
    "A",
    "qA",
    "a b",
    "a\n",
    "a$",
    "é",
    "aé",
    "a/b",
]


def test_the_queue_name_check_is_the_documented_pattern(client: Client) -> None:
    """0004 replaced the regex check with a cheaper expression: it accepts exactly what the pattern does."""
    for name in QUEUE_NAMES:
        row = client.conn.execute("select %s ~ '^[a-z0-9][a-z0-9_.-]{0,62}$' as ok", (name,)).fetchone()
        assert row is not None
        try:
            with client.conn.transaction():
                client.conn.execute("insert into gpuq.jobs (queue) values (%s)", (name,))
            accepted = True
        except psycopg.errors.CheckViolation as exc:
            assert exc.diag.constraint_name == "queue_must_be_a_lowercase_name"
            accepted = False
        assert accepted == row["ok"], name


def test_a_bad_row_in_a_multi_row_insert_writes_none_of_them(client: Client) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        client.conn.execute(
            "insert into gpuq.jobs (queue, payload) values ('q', '{}'), ('q', '[]'), ('q', '{}')"
        )
    assert job_count(client) == 0


def test_bare_insert_with_defaults_is_a_valid_job(client: Client) -> None:
    client.conn.execute("insert into gpuq.jobs default values")
    [job] = client.list_jobs()
    assert (job.queue, job.payload, job.status, job.max_attempts, job.priority) == (
        "default",
        {},
        "queued",
        3,
        0,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queue": "Bad Queue"}, "queue_must_be_a_lowercase_name"),
        ({"queue": "q", "payload": ["a"]}, "payload must be a JSON object, got list"),
        ({"queue": "q", "priority": 1000}, "priority must be between -100 and 100, got 1000"),
        ({"queue": "q", "priority": 2**40}, "out of range"),
        ({"queue": "q", "max_attempts": 0}, "max_attempts_must_be_between_1_and_100"),
        ({"queue": "q", "timeout_seconds": 0}, "timeout_seconds_must_be_between_1_and_604800"),
        ({"queue": "q", "idempotency_key": ""}, "idempotency_key_must_be_1_to_200_characters"),
        ({"queue": "q\x00"}, "queue_must_be_a_lowercase_name"),
        ({"queue": "q", "payload": {"prompt": "a\x00b"}}, "unsupported Unicode escape sequence"),
    ],
)
def test_enqueue_rejects_bad_arguments_clearly(client: Client, kwargs: dict[str, Any], message: str) -> None:
    queue = kwargs.pop("queue")
    with pytest.raises(InvalidRequest, match=message):
        client.enqueue(queue, kwargs.pop("payload", {}), **kwargs)
    assert job_count(client) == 0


def test_unknown_job_ids_are_named_in_the_error(client: Client, instance: InstanceClient) -> None:
    with pytest.raises(JobNotFound, match="job 424242 does not exist"):
        client.cancel(424242)
    # a worker is told only that it does not hold it (test_trust: a refusal says nothing about the job)
    with pytest.raises(NotHeld, match="job 424242 is not held by this instance"):
        instance.complete(424242, uuid4())
    with pytest.raises(NotHeld, match="job 424242 is not held by this instance"):
        instance.fail(424242, uuid4(), "GPU_OOM", "x")
    with pytest.raises(NotHeld, match="job 424242 is not held by this instance"):
        instance.progress(424242, uuid4(), 10)
    with pytest.raises(JobNotFound, match="job 424242 does not exist"):
        client.retry(424242)
    with pytest.raises(JobNotFound, match="job 424242 does not exist"):
        client.get(424242)


def test_complete_with_a_non_object_result_is_refused_and_the_job_stays_running(
    client: Client, instance: InstanceClient
) -> None:
    job_id = client.enqueue("q", {})
    [job] = instance.claim(["q"], 1)
    with pytest.raises(psycopg.Error, match="a job result must be a JSON object"):
        client.conn.execute(
            "select gpuq.complete_job(%s, %s, %s, '[1]'::jsonb)", (instance.secret, job_id, job.lease_token)
        )
    assert client.get(job_id).status == "running"


def test_mismatched_heartbeat_arrays_are_refused(client: Client, instance: InstanceClient) -> None:
    with pytest.raises(psycopg.Error, match="same length"):
        client.conn.execute(
            "select * from gpuq.heartbeat(%s, '{1,2}', array[gen_random_uuid()])", (instance.secret,)
        )
