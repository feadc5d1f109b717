#!/usr/bin/env python3
"""`gpuq manager run` in a hostile market, every fault at once, judged from the provider's own bill.

The Vast API stand-in (tests/standins/vast_server.py, on wall time) plays the market: 429 on every 7th
request and 502 on every 11th, bid searches that answer `dph_total` at the minimum bid, a machine stuck
loading, one whose instances exit, one whose instances are outbid, an offer the index lists that is gone,
one whose real minimum bid is above the one searched (its error carries `new_contract`), an offer that
bills above the bid queue's $/h cap, and destroys that answer success and leave the instance running. The
manager runs as its own process: SIGKILLed twice (once inside a create call) and restarted, and its
database (through a TCP proxy) refused, then black-holed, for a while each. A real `gpuq worker` runs on
each instance while the stand-in says it runs (killed when it stops: outbid, exited, destroyed).

Caps: $0.30/h per instance on the bid queue, $0.80/h in all, $0.12 a day. At the end, from the stand-in's
bill: peak committed $/h <= the cap, no rent above the per-instance cap, spend <= the budget, nothing left
running, and every queue with work served. Exit status 0 when all hold.

    .venv/bin/python scripts/market_scenario.py            # about 13 minutes, 10 jobs per queue
    .venv/bin/python scripts/market_scenario.py --short    # about 4 minutes (what CI runs)

Needs a Postgres where it may create a database (GPUQ_TEST_ADMIN_URL, default the tests' local server).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import gpuq  # noqa: E402
from gpuq.client import Client  # noqa: E402
from gpuq.db import connect  # noqa: E402
from gpuq.migrate import migrate  # noqa: E402
from gpuq.settings import Settings  # noqa: E402
from tests.standins.tcp_proxy import TcpProxy  # noqa: E402
from tests.standins.vast_server import RealClock, Rental, VastStandin  # noqa: E402

ADMIN_URL = os.environ.get("GPUQ_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY = "vk-scenario-" + secrets.token_hex(8)
DEPLOYMENT = "scenario"
LABEL_PREFIX = f"gpuq:{DEPLOYMENT}:"
PER_INSTANCE_CAP = 0.30  # the bid queue's
TOTAL_CAP = 0.80
BUDGET = 0.12


@dataclass
class Timeline:
    """Seconds from the start; scaled for --short."""

    jobs_per_queue: int
    job_seconds: float
    kill_in_create_after: float  # a SIGKILL inside the next create call after this
    refuse_at: float
    outage_s: float  # refused this long, then up for gap_s (the manager reconnects), then black-holed
    gap_s: float
    kill_at: float  # a SIGKILL wherever the manager is (in the black hole: it restarts into that)
    ghost_destroys_at: float
    outbid_after_s: float
    exit_after_s: float
    ready_timeout_s: float
    deadline: float  # give up waiting for the jobs
    window_min: int  # the queues' allowed hours end this many minutes after the start


LONG = Timeline(10, 20.0, 120, 300, 40, 20, 375, 90, 150, 60, 90, 12.5 * 60, 14)
SHORT = Timeline(8, 8.0, 25, 60, 12, 12, 90, 30, 45, 20, 45, 200, 8)


@dataclass
class Report:
    peak_committed: float = 0.0
    max_bid_rent: float = 0.0
    spend: float = 0.0
    left: list[int] = field(default_factory=list)
    jobs: dict[str, dict[str, int]] = field(default_factory=dict)
    rents: dict[str, int] = field(default_factory=dict)
    rents_per_machine: dict[int, int] = field(default_factory=dict)
    kills: int = 0
    manager_starts: int = 0
    elapsed_s: float = 0.0
    faults: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pick_zone() -> str:
    """A zone where it is nearest midday now: the budget day and the allowed hours do not roll over."""
    zones = ["UTC", "Europe/Madrid", "America/New_York", "America/Los_Angeles", "Asia/Tokyo", "Asia/Kolkata"]
    zones += ["Australia/Sydney", "Pacific/Auckland", "America/Sao_Paulo", "Asia/Dubai"]

    def distance(z: str) -> float:
        t = datetime.now(ZoneInfo(z))
        return abs(t.hour * 60 + t.minute - 12 * 60)

    return min(zones, key=distance)


def window(tz: str, minutes: int) -> str:
    now = datetime.now(ZoneInfo(tz))
    start = (now - timedelta(hours=1)).replace(second=0, microsecond=0)
    end = (now + timedelta(minutes=minutes + 1)).replace(second=0, microsecond=0)
    return f"{start:%H:%M}-{end:%H:%M}"


def config(tz: str, t: Timeline) -> dict[str, Any]:
    hours = [window(tz, t.window_min)]
    queue = {
        "provider": "vast",
        "backend": "imageops",
        "disk_gb": 60,
        "max_instances": 3,
        "target_jobs_per_instance": 2,
        "idle_timeout_s": 15,
        "windows": hours,
        "tz": tz,
    }
    return {
        "daily_budget": BUDGET,
        "max_total_dph": TOTAL_CAP,
        "budget_tz": tz,
        "ready_timeout_s": t.ready_timeout_s,
        "heartbeat_timeout_s": 60,
        "drain_timeout_s": 60,
        "cooldown_s": 20,
        "min_window_left_s": 60,
        "billing_lag_s": 30,
        "queues": {
            "bid": {
                **queue,
                "offer": {"gpu_names": ["RTX 4090"], "interruptible": True, "max_dph": PER_INSTANCE_CAP},
            },
            "od": {**queue, "offer": {"gpu_names": ["RTX A6000"], "interruptible": False}},
        },
    }


def market(standin: VastStandin, t: Timeline) -> dict[str, Any]:
    """The offers, the faulty ones marked. Storage $0.15/GB-month: $0.0125/h on the 60 GB asked for."""
    s = standin
    s.bid_dph_total = "min_bid"  # the reading that booked bids below their bill
    s.periodic_failures = [(7, 429), (11, 502)]
    faults: dict[str, Any] = {}
    # bid queue: RTX 4090, priced min_bid x 1.1 + 0.0125
    faults["stuck"] = s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.10, machine_id=11)
    s.stuck_machines.add(11)
    faults["phantom"] = s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.105, machine_id=12)
    s.phantom_offers.add(faults["phantom"])
    faults["stale_min_bid"] = s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.11, machine_id=13)
    s.stale_min_bid[faults["stale_min_bid"]] = 0.25
    faults["exits"] = s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.115, machine_id=14)
    s.exit_after[14] = t.exit_after_s
    faults["outbid"] = s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.12, machine_id=15)
    s.outbid_after[15] = t.outbid_after_s
    for machine in (16, 17, 18):
        s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.14 + machine / 1000, machine_id=machine)
    # bills 0.27 x 1.1 + 0.0125 = $0.3095/h: over the per-instance cap, yet the old reading booked it at
    # 0.297 + (0.27 - 0.50) = $0.067/h
    faults["over_cap"] = s.add_offer(gpu_name="RTX 4090", dph_base=0.50, min_bid=0.27, machine_id=19)
    # on-demand queue: RTX A6000
    faults["od_stuck"] = s.add_offer(gpu_name="RTX A6000", dph_base=0.20, machine_id=21)
    s.stuck_machines.add(21)
    for machine, price in ((22, 0.24), (23, 0.26), (24, 0.29)):
        s.add_offer(gpu_name="RTX A6000", dph_base=price, machine_id=machine)
    return faults


class Machines:
    """A `gpuq worker` per running instance, as a rented machine would start one; killed when the
    instance stops running (outbid, exited) or is destroyed."""

    def __init__(self, standin: VastStandin, worker_url: str, work: Path) -> None:
        self.standin = standin
        self.worker_url = worker_url
        self.work = work
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started = 0

    def sync(self) -> None:
        live = self.standin.live()
        for iid, rental in live.items():
            if not (rental.label or "").startswith(LABEL_PREFIX):
                continue
            running = self.standin.is_running(iid)
            proc = self.procs.get(iid)
            if running and proc is None:
                self.procs[iid] = self._start(rental)
            elif not running and proc is not None and proc.poll() is None:
                proc.kill()  # outbid or exited: its processes are gone
        for iid, proc in self.procs.items():
            if iid not in live and proc.poll() is None:
                proc.kill()  # destroyed

    def _start(self, rental: Rental) -> subprocess.Popen[bytes]:
        self.started += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
        env.update(rental.env)  # what the manager gave the instance: its queue, login and secret
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "DATABASE_URL": self.worker_url,  # the hosts' own login (as in env), its own path: no proxy
                "GPUQ_PROVIDER": "vast",
                "GPUQ_PROVIDER_INSTANCE_ID": str(rental.id),
                "GPUQ_DATA_DIR": str(self.work / f"host-{rental.id}"),
                "GPUQ_STORAGE_URL": str(self.work / "outputs"),
                "GPUQ_INPUT_DIRS": str(self.work),
                "GPUQ_LEASE_SECONDS": "20",
                "GPUQ_POLL_SECONDS": "1",
                "GPUQ_DRAIN_GRACE_SECONDS": "5",
                "GPUQ_SPOT_WATCH": "0",
                "GPUQ_LOG_LEVEL": "WARNING",
            }
        )
        env.pop("GPUQ_ORPHAN_TIMEOUT_SECONDS", None)
        out = (self.work / f"worker-{rental.id}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "gpuq.cli", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)


class ManagerProc:
    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.env = env
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed_at: float | None = None

    def start(self) -> None:
        self.starts += 1
        out = (self.work / "manager.log").open("ab")
        out.write(f"\n===== manager start {self.starts} =====\n".encode())
        out.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuq.cli", "manager", "run"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        self.killed_at = None
        log(f"manager started (pid {self.proc.pid}, start {self.starts})")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, why: str) -> bool:
        if not self.alive:
            return False
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.killed_at = time.monotonic()
        log(f"manager SIGKILLed {why}")
        return True

    def restart_if_due(self, delay: float = 3.0) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            if self.killed_at is None:
                log(f"manager exited by itself with {self.proc.returncode}; restarting")
                self.killed_at = time.monotonic()
            if time.monotonic() - self.killed_at >= delay:
                self.start()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def run(t: Timeline, work: Path) -> Report:
    report = Report()
    dbname = f"gpuq_scenario_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'create database "{dbname}"')
    db_url = make_conninfo(ADMIN_URL, dbname=dbname)
    # Rented hosts get a login of their own in role gpuq_worker (the manager refuses to rent otherwise).
    worker_role = f"gpuq_scenario_worker_{os.getpid()}_{secrets.token_hex(3)}"
    worker_url = make_conninfo(db_url, user=worker_role, password="scenario")
    settings = Settings(db_url, work / "data", False, 60, 1.0)
    standin = VastStandin(KEY, RealClock())
    standin.created_at_s, standin.loading_at_s, standin.running_at_s = 2.0, 4.0, 12.0
    standin.start()
    info = conninfo_to_dict(db_url)
    proxy = TcpProxy((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    machines = Machines(standin, worker_url, work)
    manager: ManagerProc | None = None
    try:
        with connect(db_url, settings) as conn:
            migrate(conn)
            conn.execute(f"create role {worker_role} login password 'scenario' in role gpuq_worker")
        client = Client.connect(db_url, settings)
        tz = pick_zone()
        cfg = config(tz, t)
        (work / "manager.json").write_text(json.dumps(cfg, indent=1))
        report.faults = market(standin, t)
        image = work / "in.png"
        _png(image)
        payload = {"image": str(image), "ops": [{"op": "sleep", "seconds": t.job_seconds}, {"op": "invert"}]}
        for queue in ("bid", "od"):
            for _ in range(t.jobs_per_queue):
                client.enqueue(queue, payload, max_attempts=5)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "DATABASE_URL": make_conninfo(db_url, host="127.0.0.1", port=str(proxy.port)),
                "GPUQ_WORKER_DATABASE_URL": worker_url,
                # hosts would install exactly this gpuq; here the harness runs the worker from the tree
                "GPUQ_INSTALL_SPEC": f"gpuq=={gpuq.__version__} --hash=sha256:{'0' * 64}",
                "GPUQ_MANAGER_CONFIG": str(work / "manager.json"),
                "GPUQ_DEPLOYMENT": DEPLOYMENT,
                "GPUQ_MANAGER_TICK_SECONDS": "5",
                "GPUQ_MANAGER_DB_TIMEOUT_SECONDS": "5",
                "GPUQ_ORPHAN_TIMEOUT_SECONDS": "0",
                "GPUQ_DATA_DIR": str(work / "manager-data"),
                "GPUQ_STORAGE_URL": str(work / "outputs"),
                "VAST_API_KEY": KEY,
                "GPUQ_VAST_URL": standin.url,
            }
        )
        log(f"budget zone {tz}, allowed hours {cfg['queues']['bid']['windows'][0]}; work in {work}")
        manager = ManagerProc(env, work)
        started = time.monotonic()
        killed_in_create = threading.Event()

        def kill_inside_create(rental: Rental) -> None:
            if time.monotonic() - started >= t.kill_in_create_after and not killed_in_create.is_set():
                killed_in_create.set()
                assert manager is not None
                if manager.kill(f"inside the create call that rented instance {rental.id}"):
                    report.kills += 1

        standin.on_create = kill_inside_create
        manager.start()
        done = {"kill": False, "ghosts": False}
        outage: str | None = None
        while True:
            now = time.monotonic() - started
            if not done["kill"] and now >= t.kill_at and manager.alive:
                done["kill"] = True
                manager.kill(f"mid-run (the database {outage or 'up'})")
                report.kills += 1
            if not done["ghosts"] and now >= t.ghost_destroys_at:
                done["ghosts"] = True
                standin.ghost_destroys = 2
                log("the next 2 destroys will answer success and change nothing")
            if outage is None and now >= t.refuse_at:
                outage = "refused"
                proxy.refuse()
                log("database refused")
            elif outage == "refused" and now >= t.refuse_at + t.outage_s:
                outage = "up"
                proxy.restore()
                log("database back, for now")
            elif outage == "up" and now >= t.refuse_at + t.outage_s + t.gap_s:
                outage = "blackhole"
                proxy.blackhole()
                log("database black-holed")
            elif outage == "blackhole" and now >= t.refuse_at + 2 * t.outage_s + t.gap_s:
                outage = "over"
                proxy.restore()
                log("database back")
            manager.restart_if_due()
            machines.sync()
            open_jobs = client.call(
                "select count(*) as n from gpuq.jobs where status in ('queued', 'running')"
            )
            if open_jobs[0]["n"] == 0 and outage == "over":
                log(f"all jobs finished at {now:.0f} s")
                break
            if now >= t.deadline:
                log(f"deadline: {open_jobs[0]['n']} job(s) still open")
                report.failures.append(f"{open_jobs[0]['n']} job(s) still open at the deadline")
                break
            time.sleep(0.5)
        if outage != "over":
            proxy.restore()
        # Let the manager scale to zero (idle timeout, verified destroys), then stop it.
        settle = time.monotonic() + 180
        while time.monotonic() < settle:
            manager.restart_if_due()
            machines.sync()
            if not _ours(standin.live()):
                break
            time.sleep(1)
        manager.stop()
        machines.stop()
        report.elapsed_s = time.monotonic() - started
        report.faults["killed_inside_create"] = killed_in_create.is_set()
        report.manager_starts = manager.starts
        _judge(report, standin, client)
        client.close()
        return report
    finally:
        if manager is not None and manager.proc is not None and manager.proc.poll() is None:
            manager.proc.kill()
        machines.stop()
        standin.stop()
        proxy.close()
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{dbname}" with (force)')
            admin.execute(f"drop role if exists {worker_role}")


def _ours(rentals: dict[int, Rental]) -> dict[int, Rental]:
    return {i: r for i, r in rentals.items() if (r.label or "").startswith(LABEL_PREFIX)}


def _judge(report: Report, standin: VastStandin, client: Client) -> None:
    rentals = _ours(dict(standin.rentals))
    report.peak_committed = standin.peak_committed
    bid_rents = [r.dph_total for r in rentals.values() if (r.label or "").endswith(":bid")]
    report.max_bid_rent = max(bid_rents, default=0.0)
    report.spend = sum(standin.cost_of(i) for i in rentals)
    report.left = sorted(_ours(standin.live()))
    for r in rentals.values():
        queue = (r.label or "").rsplit(":", 1)[-1]
        report.rents[queue] = report.rents.get(queue, 0) + 1
        report.rents_per_machine[r.machine_id] = report.rents_per_machine.get(r.machine_id, 0) + 1
    for row in client.call(
        "select queue, status::text as status, count(*) as n from gpuq.jobs group by 1, 2"
    ):
        report.jobs.setdefault(row["queue"], {})[row["status"]] = int(row["n"])
    if report.peak_committed > TOTAL_CAP + 1e-9:
        report.failures.append(f"peak committed ${report.peak_committed:.4f}/h > cap ${TOTAL_CAP:.2f}/h")
    if report.max_bid_rent > PER_INSTANCE_CAP + 1e-9:
        report.failures.append(f"a bid rent bills ${report.max_bid_rent:.4f}/h > ${PER_INSTANCE_CAP:.2f}/h")
    if report.spend > BUDGET + 1e-9:
        report.failures.append(f"spend ${report.spend:.4f} > budget ${BUDGET:.2f}")
    if report.left:
        report.failures.append(f"instances left running: {report.left}")
    for queue in ("bid", "od"):
        if report.jobs.get(queue, {}).get("succeeded", 0) == 0:
            report.failures.append(f"queue {queue} was never served")
    for name in ("phantom", "stale_min_bid", "over_cap"):
        offer = report.faults[name]
        creates = sum(  # answered, not turned away by a 429 or 5xx before anything was tried
            1
            for r in standin.of_kind("create")
            if r.path.rstrip("/").endswith(f"/{offer}") and r.status not in (429, 500, 502, 503)
        )
        report.faults[f"{name}_creates"] = creates
        if creates > (0 if name == "over_cap" else 1):
            report.failures.append(f"offer {name} ({offer}) was tried {creates} times")
    for machine in (11, 14, 21):  # stuck, exiting, stuck on-demand: rented again and again before
        if report.rents_per_machine.get(machine, 0) > 2:
            report.failures.append(f"machine {machine} was rented {report.rents_per_machine[machine]} times")


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI form: fewer jobs, shorter outages")
    parser.add_argument("--keep", type=Path, help="keep the logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    t = SHORT if args.short else LONG
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run(t, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="gpuq-scenario-") as tmp:
            report = run(t, Path(tmp))
            if report.failures:
                print((Path(tmp) / "manager.log").read_text()[-20000:])
    print(json.dumps(report.__dict__, indent=1, default=str))
    print(
        f"peak committed ${report.peak_committed:.4f}/h (cap ${TOTAL_CAP:.2f}/h); dearest bid rent "
        f"${report.max_bid_rent:.4f}/h (cap ${PER_INSTANCE_CAP:.2f}/h); spend ${report.spend:.4f} "
        f"(budget ${BUDGET:.2f}); left {len(report.left)}; jobs {report.jobs}; "
        f"{math.ceil(report.elapsed_s)} s"
    )
    for failure in report.failures:
        print(f"FAIL: {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
