"""The cost levers' database side (0011): the forecast from history, why each idle instance bills, and what
`manager status` and `tick --dry-run` say about them; the manager's log names instances one way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gpuq.client import Client, new_secret, secret_hash
from manager.config import from_dict
from manager.policy import Window
from manager.state import (
    forecast_from,
    idle_by_reason,
    idle_hours,
    read_forecast,
    read_snapshot,
    status_lines,
)
from manager.tick import instance_name

ROOT = Path(__file__).parent.parent.parent


def now(db: Client) -> Any:
    return db.call("select now() as t")[0]["t"]


def finished_job(
    db: Client, queue: str, finished_ago: timedelta, ran_s: float, status: str = "succeeded"
) -> None:
    """A job that ran `ran_s` seconds and finished `finished_ago` before now."""
    (job_id,) = [db.enqueue(queue, {})]
    db.conn.execute(
        "update gpuq.jobs set status = %s, started_at = now() - %s - make_interval(secs => %s), "
        "finished_at = now() - %s, created_at = now() - %s - make_interval(secs => %s) where id = %s",
        (status, finished_ago, ran_s, finished_ago, finished_ago, ran_s + 5, job_id),
    )


def test_queue_forecast_is_the_same_hour_on_past_days(client: Client) -> None:
    day = timedelta(days=1)
    # The hour from now, yesterday: 3 jobs of 60 s; two days ago: 1 job of 30 s (and one that failed);
    # yesterday outside that hour: 5 jobs that must not count.
    for _ in range(3):
        finished_job(client, "img", day - timedelta(minutes=20), 60.0)
    finished_job(client, "img", 2 * day - timedelta(minutes=40), 30.0)
    finished_job(client, "img", 2 * day - timedelta(minutes=41), 10.0, status="failed")
    for _ in range(5):
        finished_job(client, "img", day + timedelta(minutes=30), 60.0)
    finished_job(client, "tts", 3 * day - timedelta(minutes=10), 8.0)  # history three days deep

    got = read_forecast(client, now(client))
    days = got["img"][2]
    assert days == 3  # the oldest finished job is between 2 and 3 days old
    assert got["img"][0] == pytest.approx(5 / 3)  # 5 jobs in those hours over 3 days (failed ones count)
    assert got["img"][1] == pytest.approx((3 * 60 + 30) / 3, abs=0.5)  # only succeeded jobs' run time
    assert got["tts"][0] == pytest.approx(1 / 3)
    # An hour with nothing in it on any past day: no row.
    assert "img" not in read_forecast(client, now(client) + timedelta(hours=5))


def test_queue_forecast_counts_only_days_the_history_covers(client: Client) -> None:
    # History began 1.2 days ago; the one job in this hour yesterday is a whole day's worth. The hour two
    # days ago predates any job: counting it would halve the forecast.
    finished_job(client, "img", timedelta(days=1.2), 60.0)
    finished_job(client, "img", timedelta(days=1) - timedelta(minutes=20), 60.0)
    got = read_forecast(client, now(client))
    assert got["img"][2] == 1
    assert got["img"][0] == pytest.approx(1.0)


def test_idle_by_reason_names_every_live_instance_not_running_a_job(client: Client) -> None:
    ids = {}
    for name in ("booting", "idle", "draining", "busy"):
        ids[name] = client.call(
            "select gpuq.record_rent('vast', %s, 'o1', %s, 'gpuq:test:img', 'A40', 1, 46000, 0.4, true, "
            "array['img'], 'rent', 1, %s) as id",
            (f"p-{name}", f"m-{name}", secret_hash(new_secret())),
        )[0]["id"]
    client.conn.execute("update gpuq.instances set status = 'booting' where id = %s", (ids["booting"],))
    client.conn.execute(
        "update gpuq.instances set status = 'idle', created_at = now() - interval '1 hour', "
        "ready_at = now() - interval '30 minutes', "
        "last_job_at = now() - interval '5 minutes' where id = any(%s)",
        ([ids["idle"], ids["draining"], ids["busy"]],),
    )
    client.call("select gpuq.drain_instance(%s, 'drain: fewer needed')", (ids["draining"],))
    job = client.enqueue("img", {})
    client.conn.execute(
        "update gpuq.jobs set status = 'running', instance_id = %s, started_at = now(), "
        "lease_expires_at = now() + interval '1 hour' where id = %s",
        (ids["busy"], job),
    )

    rows = {r["instance_id"]: r for r in client.call("select * from gpuq.idle_by_reason()")}
    assert set(rows) == {ids["booting"], ids["idle"], ids["draining"]}  # the busy one is working
    assert rows[ids["booting"]]["reason"] == "booting"
    assert rows[ids["draining"]]["reason"] == "draining"
    assert rows[ids["idle"]]["reason"] == "waiting for work"
    assert rows[ids["idle"]]["idle_s"] == pytest.approx(300, abs=5)  # since its last job

    # The manager's settings refine "waiting for work": within the idle timeout, or past it and held.
    policy = from_dict(
        {"queues": {"img": {"provider": "vast", "idle_timeout_s": 600, "offer": {"gpu_names": ["A40"]}}}}
    ).policy
    refined = {r["instance_id"]: r["reason"] for r in idle_by_reason(client, policy)}
    assert refined[ids["idle"]] == "waiting for work (idle timeout 10 min)"
    held = from_dict(
        {
            "reboot_s": 900,
            "queues": {"img": {"provider": "vast", "idle_timeout_s": 60, "offer": {"gpu_names": ["A40"]}}},
        }
    ).policy
    refined = {r["instance_id"]: r["reason"] for r in idle_by_reason(client, held)}
    assert refined[ids["idle"]].startswith("break-even hold")
    text = "\n".join(status_lines(client, held, idle_by_reason(client, held), idle_hours(client, "UTC")))
    assert "not running a job: 3 instance(s)" in text
    assert f"instance {ids['idle']} (vast:p-idle) idle, 5 min" in text


def test_the_tick_reads_the_forecast_for_the_hour_its_window_opens(client: Client) -> None:
    t = now(client)
    opens = (t + timedelta(minutes=30)).astimezone(t.tzinfo)
    window = f"{opens:%H:%M}-{(opens + timedelta(hours=8)):%H:%M}"
    policy = from_dict(
        {
            "prewarm_s": 2700,
            "queues": {
                "img": {"provider": "vast", "windows": [window], "tz": "UTC", "offer": {"gpu_names": ["A40"]}}
            },
        }
    ).policy
    assert policy.queues["img"].windows == (Window.parse(window),)
    at = forecast_from(policy, "img", t)
    assert abs((at - opens).total_seconds()) < 60  # the window's first hour, not the next one
    # Yesterday, the window's first hour was busy; the hour from now was not.
    for _ in range(4):
        finished_job(client, "img", (t - at) + timedelta(days=1) - timedelta(minutes=45), 60.0)
    snap = read_snapshot(client, "UTC", "gpuq:test:", policy=policy, now=t)
    (img,) = [q for q in snap.queues if q.name == "img"]
    assert img.forecast_jobs == pytest.approx(4.0) and img.forecast_busy_s == pytest.approx(240, abs=1)
    # Without pre-warming the snapshot reads no forecast.
    plain = read_snapshot(client, "UTC", "gpuq:test:")
    assert all(q.forecast_jobs is None for q in plain.queues)


def test_config_keeps_the_simulators_levers_out() -> None:
    with pytest.raises(SystemExit, match="unknown keys in the configuration: cold_pool_s"):
        from_dict({"cold_pool_s": 3600, "queues": {"img": {"provider": "vast"}}})
    with pytest.raises(SystemExit, match=r"unknown keys in queues.img: packs"):
        from_dict({"queues": {"img": {"provider": "vast", "packs": ["tts"]}}})


def test_log_lines_name_an_instance_by_both_ids() -> None:
    assert instance_name(3, "local", "local-642e") == "instance 3 (local:local-642e)"


def test_manager_status_prints_why_each_idle_instance_bills(
    client: Client, db_url: str, tmp_path: Path
) -> None:
    iid = client.call(
        "select gpuq.record_rent('local', 'local-1', 'o1', 'm1', 'gpuq:default:default', 'cpu', 1, 0, 0, "
        "false, array['default'], 'rent', 1, %s) as id",
        (secret_hash(new_secret()),),
    )[0]["id"]
    client.conn.execute("update gpuq.instances set status = 'booting' where id = %s", (iid,))
    client.conn.execute("truncate gpuq.idle_ledger, gpuq.manager_ticks")
    client.call("select gpuq.record_idle(%s, %s, 60)", ([iid], ["booting"]))
    config = tmp_path / "manager.json"
    config.write_text(json.dumps({"queues": {"default": {"provider": "local", "idle_timeout_s": 10}}}))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": db_url,
        "GPUQ_MANAGER_CONFIG": str(config),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gpuq.cli", "manager", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "not running a job: 1 instance(s)" in done.stdout
    assert f"instance {iid} (local:local-1) booting" in done.stdout and ": booting" in done.stdout
    # What idling cost today, by reason (the ledger the ticks keep).
    assert "idle today (UTC) by reason" in done.stdout
    assert re.search(r"\n  booting: \d+\.\d\d instance-hours, \$\d+\.\d{4}, 1 instance\(s\)\n", done.stdout)


def rented_idle(client: Client, name: str, idle_for: timedelta, dph: float = 0.4) -> int:
    """A live, registered instance that finished its last job `idle_for` ago."""
    iid = client.call(
        "select gpuq.record_rent('vast', %s, 'o1', %s, 'gpuq:test:img', 'A40', 1, 46000, %s::numeric, true, "
        "array['img'], 'rent', 1, %s) as id",
        (f"p-{name}", f"m-{name}", dph, secret_hash(new_secret())),
    )[0]["id"]
    client.conn.execute(
        "update gpuq.instances set status = 'idle', created_at = now() - interval '3 hours', "
        "ready_at = now() - interval '2 hours', last_job_at = now() - %s where id = %s",
        (idle_for, iid),
    )
    return iid


def ledger(client: Client, iid: int) -> list[tuple[str, float, float]]:
    rows = client.call(
        "select reason, seconds, usd from gpuq.idle_ledger where instance_id = %s order by id", (iid,)
    )
    return [(r["reason"], r["seconds"], float(r["usd"])) for r in rows]


def test_record_idle_books_the_time_since_the_manager_last_looked(client: Client) -> None:
    client.conn.execute("truncate gpuq.idle_ledger, gpuq.manager_ticks")
    iid = rented_idle(client, "idle", timedelta(minutes=50))
    busy = rented_idle(client, "busy", timedelta(minutes=50))
    job = client.enqueue("img", {})
    client.conn.execute(
        "update gpuq.jobs set status = 'running', instance_id = %s, started_at = now(), "
        "lease_expires_at = now() + interval '1 minute' where id = %s",
        (busy, job),
    )
    # The previous tick was a minute ago: one minute is booked to the reason (the instance running a job,
    # passed by mistake, gets nothing).
    client.conn.execute(
        "insert into gpuq.manager_ticks (singleton, last_tick_at) values (true, now() - interval '60 s')"
    )
    assert (
        client.call("select gpuq.record_idle(%s, %s, 60) as n", ([iid, busy], ["waiting", "waiting"]))[0]["n"]
        == 1
    )
    [(reason, seconds, usd)] = ledger(client, iid)
    assert (
        reason == "waiting"
        and seconds == pytest.approx(60, abs=2)
        and usd == pytest.approx(60 * 0.4 / 3600, abs=1e-4)
    )
    assert ledger(client, busy) == []
    # The manager was down for half an hour: two ticks' worth go to the reason, the rest is unseen.
    client.conn.execute("update gpuq.idle_ledger set at = now() - interval '30 minutes'")
    client.conn.execute("update gpuq.manager_ticks set last_tick_at = now() - interval '30 minutes'")
    client.call("select gpuq.record_idle(%s, %s, 60)", ([iid], ["held"]))
    assert [(r, round(s)) for r, s, _ in ledger(client, iid)[1:]] == [
        ("held", 120),
        ("unseen: the manager did not look", 1680),
    ]
    today = {
        r["reason"]: r
        for r in client.call("select * from gpuq.idle_hours_by_reason(now() - interval '1 day')")
    }
    assert today["unseen: the manager did not look"]["hours"] == pytest.approx(1680 / 3600, abs=0.01)
    assert float(today["held"]["usd"]) == pytest.approx(120 * 0.4 / 3600, abs=1e-4)
    # Bad calls are refused, not booked.
    for args in (([iid], ["x"], 0), ([iid], ["x"], -5), ([iid], ["x", "y"], 60), ([iid], ["x"], 1e9)):
        with pytest.raises(Exception, match="must be"):
            client.call("select gpuq.record_idle(%s, %s, %s)", args)


def test_a_host_can_neither_book_nor_read_idle_time(client: Client, worker_login: str, settings: Any) -> None:
    iid = rented_idle(client, "victim", timedelta(minutes=5))
    host = Client.connect(worker_login, settings)
    try:
        for sql, args in (
            ("select gpuq.record_idle(%s, %s, 60)", ([iid], ["forged"])),
            ("select * from gpuq.idle_hours_by_reason(now() - interval '1 day')", ()),
            ("select * from gpuq.idle_ledger", ()),
        ):
            with pytest.raises(Exception, match="permission denied"):
                host.call(sql, args)
    finally:
        host.close()
    assert "forged" not in [r for r, _, _ in ledger(client, iid)]
