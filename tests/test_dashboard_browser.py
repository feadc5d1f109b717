"""The dashboard as an operator uses it: Debian's headless Chromium, driven by Playwright, logs in to a
real `gpuq dashboard` process while a real `gpuq worker` process runs imageops jobs. It watches a job's
progress move and finish, cancels a running job and sees its worker stop it, drains the worker's instance
and sees it leave. Screenshots go to the test's tmp dir (and to GPUQ_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuq.client import Client
from gpuq.dashboard.auth import hash_password
from tests.worker.test_worker import WorkerProc, free_port, make_png, start_worker, wait_for  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
PASSWORD = "night-shift-operator"
# No network here: nothing for the browser to fetch or phone home to.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium (.ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def dashboard(db_url: str, client: Client, tmp_path: Path) -> Iterator[str]:
    """`gpuq dashboard` as a process, with one operator login; answers its URL."""
    client.conn.execute("truncate gpuq.queue_settings, gpuq.operator_actions restart identity")
    users = tmp_path / "users"
    users.write_text(f"alice:operator:{hash_password(PASSWORD)}\n")
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "PYTHONPATH": str(REPO),
        "GPUQ_DATA_DIR": str(tmp_path / "dashboard-data"),
        "GPUQ_DASHBOARD_USERS": str(users),
        "GPUQ_DASHBOARD_REFRESH_SECONDS": "1",
    }
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuq.cli", "dashboard", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(
            lambda: f"gpuq dashboard: {url}" in (tmp_path / "dashboard.log").read_text(), 60, "the dashboard"
        )
        yield url
    finally:
        proc.terminate()  # by PID: only the process this test started
        proc.wait(20)
        log.close()


@pytest.fixture
def page(dashboard: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(
            http_credentials={"username": "alice", "password": PASSWORD},
            viewport={"width": 1400, "height": 1300},
        )
        tab = context.new_page()
        tab.on("dialog", lambda dialog: dialog.accept("from the browser test"))  # confirms and reasons
        tab.goto(dashboard)
        tab.wait_for_selector("#live[data-state=live]", timeout=20000)
        yield tab
        browser.close()


def shoot(tab: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"dashboard-{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    if os.environ.get("GPUQ_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["GPUQ_SCREENSHOT_DIR"]) / path.name)
    return path


def row(tab: Any, section: str, job_or_instance: str, ident: int) -> Any:
    return tab.locator(f"#sec-{section} tr[data-{job_or_instance}-id='{ident}']")


def test_an_operator_watches_progress_cancels_a_job_and_drains_an_instance(
    page: Any,
    client: Client,
    start_worker: Callable[..., WorkerProc],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    tab = page
    picture = make_png(tmp_path / "in.png", (32, 32))
    worker = start_worker("demo=imageops", lease=8)  # heartbeats every 2 s: cancels and drains arrive fast

    # 0. Pause a queue nobody should serve yet: its row says who paused it, and its jobs wait.
    for n in range(3):
        client.enqueue("tts", {"text": f"hola {n}"})
    tab.locator("#sec-queues tr[data-queue=tts] button[data-action=pause]").click()
    tab.wait_for_selector("#sec-queues tr[data-queue=tts] >> text=paused by alice", timeout=20000)
    assert [r["paused_by"] for r in client.call("select * from gpuq.paused_queues()")] == ["alice"]
    tab.reload()  # a new page: its charts are read now, with these jobs in them
    tab.wait_for_selector("#live[data-state=live]", timeout=20000)

    # 1. A job of four 1.5 s steps: its progress bar moves 0 -> 20 -> 40 -> 60 -> 80, then it finishes.
    steps = [{"op": "sleep", "seconds": 1.5}] * 4 + [{"op": "invert"}]
    watched = client.enqueue("demo", {"image": str(picture), "ops": steps})
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while not row(tab, "finished", "job", watched).count():
        assert time.monotonic() < deadline, f"job {watched} never finished on the page; progress seen {seen}"
        # Read in one step that does not wait: the row may leave the running table (the job finished)
        # between a count() and a get_attribute(), which would then wait 30 s for it to come back.
        progress = tab.evaluate(
            "s => document.querySelector(s)?.getAttribute('data-progress') ?? null",
            f"#sec-running tr[data-job-id='{watched}']",
        )
        if progress is not None:
            value = int(progress or 0)
            if not seen or value != seen[-1]:
                seen.append(value)
                if len([v for v in seen if v > 0]) == 2:  # mid-way: the README's picture
                    shoot(tab, tmp_path, "progress")
        time.sleep(0.1)
    assert row(tab, "finished", "job", watched).get_attribute("data-status") == "succeeded"
    assert len([v for v in seen if v > 0]) >= 2 and seen == sorted(seen), seen  # it moved, forward only
    assert client.get(watched).status == "succeeded"

    # 2. A job that would sleep a minute: cancel it from the page; its worker stops it.
    long = client.enqueue("demo", {"image": str(picture), "ops": [{"op": "sleep", "seconds": 60}]})
    running = row(tab, "running", "job", long)
    running.wait_for(timeout=20000)
    running.locator("button[data-action=cancel]").click()
    tab.wait_for_selector(f"#sec-finished tr[data-job-id='{long}'][data-status=cancelled]", timeout=30000)
    assert "cancel" in tab.inner_text("#flash")
    stopped = client.get(long)
    assert (stopped.status, stopped.error_code) == ("cancelled", "CANCELLED")
    assert row(tab, "actions", "action", 2).inner_text().split("\t")[1:4] == [
        "alice",
        "cancel_job",
        str(long),
    ]
    shoot(tab, tmp_path, "cancelled")

    # 3. Drain the worker's instance while it runs a job: the job finishes, nothing more is claimed, the
    #    worker leaves (its instance ends), and the page shows it.
    last = client.enqueue("demo", {"image": str(picture), "ops": [{"op": "sleep", "seconds": 2}]})
    row(tab, "running", "job", last).wait_for(timeout=20000)
    instance = row(tab, "instances", "instance", worker.instance_id)  # type: ignore[arg-type]
    instance.locator("button[data-action=drain]").click()
    after = client.enqueue("demo", {"image": str(picture), "ops": [{"op": "invert"}]})
    tab.wait_for_selector(
        f"#sec-instances tr[data-instance-id='{worker.instance_id}'][data-status=terminated]", timeout=30000
    )
    assert worker.proc.wait(30) == 0
    assert client.get(last).status == "succeeded"  # finished inside the drain's grace
    assert client.get(after).status == "queued"  # never claimed by the draining instance
    drained = client.call(
        "select message from gpuq.instance_events where instance_id = %s and event = 'draining'",
        (worker.instance_id,),
    )
    assert [d["message"] for d in drained] == ["drained by alice: from the browser test"]
    assert re.search(r"the manager asked this instance to drain", worker.log)
    shoot(tab, tmp_path, "drained")
