"""Real processes, real kills: several claimers share a queue; a killed worker's job is finished elsewhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from gpuq.client import Client, NotHeld

CLAIMER = str(Path(__file__).parent / "procs" / "claimer.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}


def test_many_processes_claim_thousands_of_jobs_each_exactly_once(client: Client) -> None:
    total = 3000
    client.conn.execute(
        "insert into gpuq.jobs (queue, payload) select 'bulk', jsonb_build_object('n', g) "
        "from generate_series(1, %s) g",
        (total,),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, CLAIMER, client.url, "bulk", "drain", str(batch)],
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for batch in (1, 5, 10, 25)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]

    claims = [tuple(map(int, line.split())) for out in outputs for line in out.splitlines()]
    claimed_ids = [job_id for job_id, _ in claims]
    assert len(claimed_ids) == total and len(set(claimed_ids)) == total  # nobody claimed a job twice
    assert {attempt for _, attempt in claims} == {1}
    assert all(len(out.splitlines()) > 0 for out in outputs)  # every process took part
    row = client.conn.execute(
        "select count(*) filter (where status = 'succeeded') as ok, count(*) as n from gpuq.jobs"
    ).fetchone()
    assert row == {"ok": total, "n": total}
    # a healthy drain writes no history rows: each job's successful attempt is its row
    events = client.conn.execute("select count(*) as n from gpuq.job_events").fetchone()
    assert events == {"n": 0}
    [final] = client.history(claimed_ids[0])
    assert (final["event"], final["attempt"]) == ("succeeded", 1)


def test_a_worker_killed_mid_job_loses_its_job_to_another_which_finishes_it(client: Client) -> None:
    job_id = client.enqueue("crash", {"work": "long"})
    victim = subprocess.Popen(
        [sys.executable, CLAIMER, client.url, "crash", "hang", "1", "2"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert victim.stdout is not None
    line = victim.stdout.readline().split()
    assert line[:2] == [str(job_id), "1"]
    token, secret = UUID(line[2]), line[3]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    assert client.get(job_id).status == "running"  # nobody said goodbye

    time.sleep(2.2)  # past the 2 s lease
    rescuer = subprocess.run(
        [sys.executable, CLAIMER, client.url, "crash", "drain", "1", "30"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert rescuer.returncode == 0, rescuer.stderr
    assert rescuer.stdout.split() == [str(job_id), "2"]

    job = client.get(job_id)
    assert (job.status, job.attempt) == ("succeeded", 2)
    with pytest.raises(NotHeld):
        client.as_instance(secret).complete(job_id, token, {"late": "from the dead attempt"})
    assert client.get(job_id).result != {"late": "from the dead attempt"}
    assert [e["event"] for e in client.history(job_id)] == ["lease_expired", "succeeded"]


def test_a_restarted_worker_hands_back_at_once_what_the_killed_one_held(client: Client) -> None:
    """Killed between its claim and its work (the claim's reply lost with it, as far as anyone can tell),
    the worker's instance still holds the job under a long lease. The worker that takes the instance up
    again (same secret) registers, and the job is back in the queue at once, not when the lease runs out."""
    job_id = client.enqueue("restart", {})
    victim = subprocess.Popen(
        [sys.executable, CLAIMER, client.url, "restart", "hang", "1", "600"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert victim.stdout is not None
    line = victim.stdout.readline().split()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    secret = line[3]
    lease = client.get(job_id).lease_expires_at
    assert client.get(job_id).status == "running" and lease is not None

    again = subprocess.run(
        [sys.executable, CLAIMER, client.url, "restart", "register", "1", "600", secret],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    job = client.get(job_id)
    assert (job.status, job.error_code, job.lease_token) == ("queued", "LEASE_EXPIRED", None)
    assert [e["message"] for e in client.history(job_id)] == ["its worker restarted; queued again"]
