"""`gpuq demo`: the whole product on one machine, on embedded defaults.

Embedded Postgres (unless DATABASE_URL is set), local storage, local worker processes. Jobs are enqueued
with a plain SQL INSERT, as an app would; the manager ticks, starts workers on demand (the local provider,
$0/h), the workers run the model-free `imageops` backend and write output files, and once the queue has
been idle for the idle timeout the manager stops the workers again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from PIL import Image, ImageDraw

from gpuq.client import FINISHED, Client, open_client
from gpuq.dashboard.board import Budget
from gpuq.dashboard.server import Background, DashboardSettings, start_background
from gpuq.output import progress_bar
from gpuq.settings import Settings
from manager.cli import build_providers
from manager.config import ManagerSettings, from_dict
from manager.metrics import Metrics
from manager.tick import Manager, tick

QUEUE = "demo"
INPUTS_DIR = "demo-inputs"  # under the data dir
OPS = (
    [{"op": "invert"}],
    [{"op": "blur", "radius": 4}, {"op": "grayscale"}],
    [{"op": "resize", "width": 128, "height": 128}, {"op": "invert"}],
)


class _QuietIdleTicks(logging.Filter):
    """The demo ticks every second; its idle ticks would bury the lines that show something happening."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("nothing to do")


def make_inputs(directory: Path, count: int) -> list[Path]:
    """Small coloured pictures to transform, made here so the demo needs nothing from outside."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = directory / f"input-{n}.png"
        image = Image.new("RGB", (256, 256), (40 * n % 256, 120, 200))
        draw = ImageDraw.Draw(image)
        draw.ellipse((48, 48, 208, 208), fill=(250, 200 - 30 * n % 200, 40))
        draw.text((20, 20), f"gpuq demo {n}", fill=(0, 0, 0))
        image.save(path)
        paths.append(path)
    return paths


def demo_settings(data_dir: Path, idle_timeout_s: float) -> ManagerSettings:
    raw = {
        "daily_budget": 1.0,  # local workers cost $0/h; the caps still apply
        "max_total_dph": 1.0,
        "cooldown_s": 0,
        "queues": {
            QUEUE: {
                "provider": "local",
                "backend": "imageops",
                "max_instances": 2,
                "target_jobs_per_instance": 3,
                "idle_timeout_s": idle_timeout_s,
                "env": {
                    # the workers may read the demo's pictures; local inputs are refused everywhere else
                    "GPUQ_INPUT_DIRS": str(data_dir / INPUTS_DIR),
                    # An instance reads busy from its last job's claim until its next heartbeat says idle
                    # (default every lease/4 = 15 s): the idle timeout only starts counting for the manager
                    # then. A heartbeat a second lets the demo end right after its idle timeout.
                    "GPUQ_HEARTBEAT_SECONDS": "1",
                },
            }
        },
    }
    base = from_dict(raw)
    return ManagerSettings(
        policy=base.policy,
        launch=base.launch,
        providers=("local",),
        deployment="demo",
        storage_url=str(data_dir / "outputs"),
    )


def enqueue(client: Client, inputs: list[Path], jobs: int) -> list[int]:
    ids = []
    for n in range(jobs):
        payload = {"image": str(inputs[n % len(inputs)]), "ops": OPS[n % len(OPS)], "format": "png"}
        sql = "insert into gpuq.jobs (queue, payload) values (%s, %s) returning id"
        row = client.conn.execute(sql, (QUEUE, json.dumps(payload))).fetchone()
        assert row is not None
        ids.append(int(row["id"]))
    print(f"enqueued {jobs} jobs with plain SQL, as an app would:")
    print(f"  insert into gpuq.jobs (queue, payload) values ('{QUEUE}', '{json.dumps(payload)}');")
    return ids


def run_demo(
    settings: Settings,
    *,
    jobs: int = 6,
    idle_timeout_s: float = 10.0,
    tick_s: float = 1.0,
    timeout_s: float = 300.0,
) -> int:
    client = open_client(settings)
    logging.getLogger("gpuq.manager").addFilter(_QuietIdleTicks())
    dashboard = None
    try:
        ms = demo_settings(settings.data_dir, idle_timeout_s)
        dashboard = _dashboard(client.url, settings, ms)
        providers = build_providers(ms, client.url, settings)
        manager = Manager(client, ms, providers, Metrics())
        inputs = make_inputs(settings.data_dir / INPUTS_DIR, 3)
        ids = enqueue(client, inputs, jobs)
        reported: set[int] = set()
        started = time.monotonic()
        idle_since: float | None = None
        with progress_bar(f"{jobs} jobs", jobs) as bar:
            while time.monotonic() - started < timeout_s:
                tick(manager)
                for job in (client.get(i) for i in ids if i not in reported):
                    if job.status in FINISHED:
                        reported.add(job.id)
                        outputs = [o["url"] for o in (job.result or {}).get("outputs", [])]
                        detail = ", ".join(outputs) or f"{job.error_code}: {job.error_message}"
                        bar.print(f"job {job.id} {job.status}: {detail}")
                        bar.update(len(reported), f"{len(reported)} of {jobs} jobs finished")
                workers = providers["local"].list_instances(ms.label_prefix)
                if len(reported) == len(ids):
                    if idle_since is None:
                        idle_since = time.monotonic()
                        bar.print(
                            f"all {len(ids)} jobs finished; the manager stops the workers once they have "
                            f"been idle for {idle_timeout_s:g} s (the idle timeout)"
                        )
                    if not workers:
                        waited = time.monotonic() - idle_since
                        bar.print(f"the manager stopped the idle workers {waited:.0f} s later")
                        bar.print("see them with: gpuq list --queue demo; gpuq show ID; gpuq stats")
                        failed = [i for i in ids if client.get(i).status != "succeeded"]
                        return 1 if failed else 0
                time.sleep(tick_s)
        print(f"gpuq demo: gave up after {timeout_s:g} s; {len(reported)} of {len(ids)} jobs finished")
        return 1
    finally:
        # interrupted or timed out: no worker process outlives the demo (each drains on SIGTERM)
        local = providers["local"] if "providers" in locals() else None
        if local is not None:
            for worker in local.list_instances(ms.label_prefix):
                local.destroy(worker.provider_id)
        if dashboard is not None:
            dashboard.stop()
        client.close()


def _dashboard(url: str, settings: Settings, ms: ManagerSettings) -> Background | None:
    """The dashboard while the demo runs (GPUQ_DASHBOARD_PORT, or any free port), its URL printed."""
    try:
        dashboard = start_background(
            url, settings, Budget.of(ms.policy), DashboardSettings.from_env(), any_port=True
        )
    except OSError as e:  # the demo does not need it
        print(f"(no dashboard: {e})")
        return None
    print(f"watch it live: {dashboard.url}  (afterwards: gpuq dashboard)", flush=True)
    return dashboard
