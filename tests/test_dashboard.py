"""The dashboard over real HTTP (uvicorn on a loopback port) against real Postgres: logins and rights,
CSRF, what a hostile host's text becomes on the page, the live event stream, the controls, and starting
it (`gpuq dashboard`, `gpuq manager run`). The browser test is tests/test_dashboard_browser.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpuq.client import Client
from gpuq.dashboard.auth import UsersError, check_password, hash_password, parse_users
from gpuq.dashboard.board import Budget, gpu_readings
from gpuq.dashboard.server import (
    Background,
    DashboardSettings,
    build_app,
    start_background,
    start_beside_manager,
)
from gpuq.settings import Settings
from manager.policy import PolicySettings
from tests.conftest import enroll

REPO = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-operator-pw", "victor": "victor-viewer-pw"}
BUDGET = Budget(10.0, 2.0, "UTC")
POLICY = PolicySettings(queues={}, max_total_dph=2.0, daily_budget=10.0)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users"
    path.write_text(
        "# gpuq dashboard users\n"
        f"alice:operator:{hash_password(PASSWORDS['alice'])}\n"
        f"victor:viewer:{hash_password(PASSWORDS['victor'])}\n"
    )
    return path


@pytest.fixture
def serve(db_url: str, settings: Settings, client: Client) -> Iterator[Callable[..., Background]]:
    """A dashboard on a free loopback port, against the test database (emptied by `client`)."""
    client.conn.execute("truncate gpuq.queue_settings, gpuq.operator_actions, gpuq.avoided_machines")
    started: list[Background] = []

    def start(users: Path | None = None) -> Background:
        ds = DashboardSettings(host="127.0.0.1", port=0, users_file=users, refresh_seconds=0.5)
        bg = start_background(db_url, settings, BUDGET, ds)
        started.append(bg)
        return bg

    yield start
    for bg in started:
        bg.stop()


def login(name: str) -> tuple[str, str]:
    return (name, PASSWORDS[name])


def post(
    bg: Background,
    action: str,
    body: Any,
    *,
    auth: tuple[str, str] | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """A control as the page sends it (with the page's CSRF token unless `token` says otherwise)."""
    session = requests.Session()
    session.auth = auth
    if token is None:
        page = session.get(bg.url)
        token = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page.text)[1]  # type: ignore[index]
    return session.post(
        f"{bg.url}api/{action}",
        data=json.dumps(body),
        headers={"Content-Type": "application/json", "X-CSRF-Token": token, **(headers or {})},
    )


def audit(client: Client) -> list[tuple[str, str, str]]:
    return [
        (r["actor"], r["action"], r["target"])
        for r in client.call("select * from gpuq.dashboard_actions() order by id")
    ]


# ------------------------------------------------------------------------------------ who may use it


def test_on_loopback_without_logins_it_serves_but_only_to_loopback_host_names(
    serve: Callable[..., Background], client: Client
) -> None:
    client.enqueue("images", {})
    bg = serve()
    page = requests.get(bg.url)
    assert page.status_code == 200 and 'data-queue="images"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    # a page of evil.example whose name was rebound to 127.0.0.1 (DNS rebinding) is not this page
    rebound = requests.get(bg.url, headers={"Host": f"evil.example:{bg.port}"})
    assert rebound.status_code == 421 and "images" not in rebound.text
    assert requests.get(bg.url, headers={"Host": f"localhost:{bg.port}"}).status_code == 200


def test_off_loopback_it_refuses_to_start_without_logins(
    db_url: str, settings: Settings, users_file: Path, tmp_path: Path
) -> None:
    for host in ("0.0.0.0", "192.0.2.10", "::"):
        with pytest.raises(SystemExit, match=r"refusing to serve on .* without logins.*GPUQ_DASHBOARD_USERS"):
            build_app(db_url, settings, BUDGET, DashboardSettings(host=host))
    build_app(db_url, settings, BUDGET, DashboardSettings(host="0.0.0.0", users_file=users_file))  # builds

    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(REPO), "GPUQ_DATA_DIR": str(tmp_path)}
    env.pop("GPUQ_DASHBOARD_USERS", None)
    done = subprocess.run(
        [sys.executable, "-m", "gpuq.cli", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0 without logins" in done.stderr


def test_a_login_is_needed_and_a_viewer_gets_no_controls(
    serve: Callable[..., Background], users_file: Path, client: Client
) -> None:
    client.enqueue("images", {})
    bg = serve(users_file)
    assert requests.get(bg.url).status_code == 401
    assert requests.get(bg.url).headers["www-authenticate"].startswith("Basic")
    assert requests.get(bg.url, auth=("alice", "wrong")).status_code == 401
    assert requests.get(bg.url, auth=("mallory", "alice-operator-pw")).status_code == 401
    assert requests.get(f"{bg.url}events", auth=("alice", "wrong")).status_code == 401
    assert requests.get(f"{bg.url}static/dashboard.js").status_code == 401

    viewer = requests.get(bg.url, auth=login("victor"))
    assert viewer.status_code == 200 and "victor · viewer" in viewer.text
    assert 'data-queue="images"' in viewer.text and "data-action=" not in viewer.text
    operator = requests.get(bg.url, auth=login("alice"))
    assert 'data-action="pause" data-target="images"' in operator.text


def test_a_viewer_may_not_act_and_nothing_changes(
    serve: Callable[..., Background], users_file: Path, client: Client
) -> None:
    job = client.enqueue("images", {})
    bg = serve(users_file)
    refused = post(bg, "cancel", {"target": job}, auth=login("victor"))
    assert refused.status_code == 403 and "may look but not act" in refused.json()["error"]
    assert client.get(job).status == "queued" and audit(client) == []


@pytest.mark.parametrize(
    ("token", "headers", "status", "why"),
    [
        ("", {}, 403, "CSRF token"),
        ("0" * 64, {}, 403, "CSRF token"),
        (None, {"Origin": "https://evil.example"}, 403, "cross-origin"),
        (None, {"Content-Type": "text/plain"}, 415, "application/json"),
        (None, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ],
)
def test_a_control_without_the_pages_token_origin_and_json_is_refused(
    serve: Callable[..., Background],
    users_file: Path,
    client: Client,
    token: str | None,
    headers: dict[str, str],
    status: int,
    why: str,
) -> None:
    """What another site could make a logged-in operator's browser send (a form, a fetch without the
    token, a request from its own origin) does nothing."""
    job = client.enqueue("images", {})
    bg = serve(users_file)
    refused = post(bg, "cancel", {"target": job}, auth=login("alice"), token=token, headers=headers)
    assert refused.status_code == status and why in refused.json()["error"]
    assert client.get(job).status == "queued" and audit(client) == []


def test_the_csrf_token_is_the_users_own(
    serve: Callable[..., Background], users_file: Path, client: Client
) -> None:
    job = client.enqueue("images", {})
    bg = serve(users_file)
    theirs = requests.get(bg.url, auth=login("victor")).text
    victors = re.search(r'name="csrf-token" content="([0-9a-f]+)"', theirs)[1]  # type: ignore[index]
    assert post(bg, "cancel", {"target": job}, auth=login("alice"), token=victors).status_code == 403
    assert client.get(job).status == "queued"


# -------------------------------------------------------------------------------------------- controls


def test_each_control_calls_its_transition_and_records_who(
    serve: Callable[..., Background], users_file: Path, client: Client
) -> None:
    bg = serve(users_file)
    alice = login("alice")
    queued = client.enqueue("images", {})
    worker = enroll(client, ("images",))

    ok = post(bg, "cancel", {"target": queued, "reason": "wrong input"}, auth=alice)
    assert ok.status_code == 200 and ok.json()["outcome"] == "cancelled"
    assert client.get(queued).status == "cancelled"
    assert post(bg, "retry", {"target": str(queued)}, auth=alice).status_code == 200
    assert client.get(queued).status == "queued"
    assert (
        post(bg, "pause", {"target": "images", "reason": "new model"}, auth=alice).json()["outcome"] == "true"
    )
    assert worker.claim(None, 1) == []
    assert post(bg, "resume", {"target": "images"}, auth=alice).status_code == 200
    assert post(bg, "drain", {"target": worker.instance_id}, auth=alice).json()["outcome"] == "draining"
    assert worker.claim(None, 1) == []
    destroyed = post(bg, "destroy", {"target": worker.instance_id, "reason": "bad GPU"}, auth=alice)
    assert destroyed.status_code == 200
    status = client.call("select status from gpuq.instances where id = %s", (worker.instance_id,))[0][
        "status"
    ]
    assert status == "failed"  # revoked: the manager's next tick destroys the machine
    n, iid = str(queued), str(worker.instance_id)
    assert audit(client) == [
        ("alice", "cancel_job", n),
        ("alice", "retry_job", n),
        ("alice", "pause_queue", "images"),
        ("alice", "resume_queue", "images"),
        ("alice", "drain_instance", iid),
        ("alice", "destroy_instance", iid),
    ]


@pytest.mark.parametrize(
    ("action", "body", "status", "says"),
    [
        ("cancel", {"target": "abc"}, 400, "must be a job or instance id"),
        ("cancel", {"target": -3}, 400, "positive id"),
        ("cancel", {"target": True}, 400, "must be a job or instance id"),
        ("cancel", {"target": 10**30}, 400, "positive id"),
        ("cancel", {}, 400, "must be a job or instance id"),
        ("cancel", {"target": 99999999}, 404, "does not exist"),
        ("retry", {"target": "JOB"}, 400, "only failed or cancelled jobs can be retried"),
        ("drain", {"target": 99999999}, 404, "does not exist"),
        ("pause", {"target": "Not A Queue"}, 400, "queue_must_be_a_lowercase_name"),
        ("pause", {"target": 7}, 400, "must be a queue name"),
        ("pause", {"target": "q", "reason": {"x": 1}}, 400, "reason must be text"),
        ("explode", {"target": 1}, 404, "unknown action"),
        ("cancel", [1, 2], 400, "must be a JSON object"),
    ],
)
def test_bad_control_requests_get_a_clear_answer_and_change_nothing(
    serve: Callable[..., Background], client: Client, action: str, body: Any, status: int, says: str
) -> None:
    job = client.enqueue("images", {})
    if body == {"target": "JOB"}:
        body = {"target": job}  # queued: not retryable
    bg = serve()
    refused = post(bg, action, body)
    assert refused.status_code == status and says in refused.json()["error"]
    assert client.get(job).status == "queued" and audit(client) == []
    assert client.call("select * from gpuq.paused_queues()") == []


def test_a_body_that_is_not_json_is_refused(serve: Callable[..., Background]) -> None:
    bg = serve()
    page = requests.get(bg.url).text
    token = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page)[1]  # type: ignore[index]
    refused = requests.post(
        f"{bg.url}api/cancel",
        data="{not json",
        headers={"Content-Type": "application/json", "X-CSRF-Token": token},
    )
    assert refused.status_code == 400 and refused.json()["error"] == "the body must be JSON"


# ------------------------------------------------------------------------- what a stranger's text becomes


def test_text_a_rented_host_wrote_is_shown_as_text_never_as_markup(
    serve: Callable[..., Background], client: Client
) -> None:
    """A host controls its hostname, progress messages, error messages and metrics. On the page they are
    text: no tag, no attribute, no script of theirs reaches the operator's browser."""
    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>"><a href="javascript:alert(3)">'
    host = enroll(client, ("images",))
    host.register(hostname=evil[:255], version="1.0")
    running, failing = client.enqueue("images", {}), client.enqueue("images", {})
    jobs = {j.id: j for j in host.claim(None, 2)}
    host.progress(running, jobs[running].lease_token, 30, evil)  # type: ignore[arg-type]
    host.fail(failing, jobs[failing].lease_token, "BACKEND_ERROR", evil, retryable=False)  # type: ignore[arg-type]
    metrics = {
        "gpus": [
            {"utilization_percent": "<b>99</b>", "memory_used_mb": float("1e308"), "memory_total_mb": -5}
        ]
    }
    host.heartbeat([(running, jobs[running].lease_token)], metrics)  # type: ignore[list-item]

    bg = serve()
    page = requests.get(bg.url).text
    assert "<script>alert" not in page and "<img src=x" not in page and 'href="javascript:' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, escaped
    assert "<b>99</b>" not in page and "? % · ? / ?" in page  # unusable readings shown as unknown

    with requests.get(f"{bg.url}events", stream=True, timeout=20) as stream:
        event = next_event(stream.iter_lines(decode_unicode=True), "sections")
    html = "".join(event["sections"].values())
    assert "<script>alert" not in html and "<img src=x" not in html and "&lt;script&gt;" in html


def test_gpu_readings_keep_only_plain_numbers_in_range() -> None:
    assert gpu_readings(
        {"gpus": [{"utilization_percent": 55, "memory_used_mb": 100, "memory_total_mb": 200}]}
    ) == [{"util": 55.0, "used_mb": 100.0, "total_mb": 200.0}]
    odd = [{"utilization_percent": True, "memory_used_mb": "7", "memory_total_mb": float("nan")}, "x", None]
    assert gpu_readings({"gpus": odd}) == [{"util": None, "used_mb": None, "total_mb": None}]
    assert (
        gpu_readings({"gpus": [{"utilization_percent": 101}] * 50})
        == [{"util": None, "used_mb": None, "total_mb": None}] * 16
    )
    for metrics in (None, [], "gpus", {"gpus": {"0": {}}}, {"gpus": "many"}):
        assert gpu_readings(metrics) == []


# ----------------------------------------------------------------------------------------- live updates


def next_event(lines: Iterator[str], kind: str, timeout: float = 15.0) -> Any:
    """The data of the next server-sent event of that kind, from the stream's lines (one iterator per
    stream: each holds what it has read ahead)."""
    deadline = time.monotonic() + timeout
    event = None
    for raw in lines:
        if time.monotonic() > deadline:
            break
        if raw.startswith("event: "):
            event = raw[7:]
        elif raw.startswith("data: ") and event == kind:
            return json.loads(raw[6:])
    raise AssertionError(f"no {kind} event within {timeout} s")


def test_the_event_stream_sends_the_tables_and_charts_and_each_change(
    serve: Callable[..., Background], client: Client
) -> None:
    first = client.enqueue("images", {})
    bg = serve()
    with requests.get(f"{bg.url}events", stream=True, timeout=20) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines(decode_unicode=True)
        sections = next_event(lines, "sections")["sections"]
        assert set(sections) == {
            "money",
            "queues",
            "instances",
            "running",
            "finished",
            "failures",
            "decisions",
            "actions",
        }
        assert 'data-queue="images"' in sections["queues"]
        history = next_event(lines, "history")
        assert len(history["t"]) == 97 and history["queues"]["images"][-1] == 1  # 24 h in 15 min steps
        assert set(history) == {"t", "queues", "instances", "dph", "spend"}

        client.enqueue("videos", {})  # a change: the NOTIFY wakes the page's reader
        deadline = time.monotonic() + 15
        while 'data-queue="videos"' not in next_event(lines, "sections")["sections"]["queues"]:
            assert time.monotonic() < deadline, "the new queue never reached the stream"
    assert client.get(first).status == "queued"


# ----------------------------------------------------------------------------------------- starting it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_page(url: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            return requests.get(url, timeout=5)
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def test_manager_run_serves_the_dashboard_beside_its_loop(
    db_url: str, client: Client, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "PYTHONPATH": str(REPO),
        "GPUQ_DATA_DIR": str(tmp_path),
        "GPUQ_DASHBOARD_PORT": str(port),
        "GPUQ_MANAGER_TICK_SECONDS": "1",
        "GPUQ_DAILY_BUDGET": "7",
    }
    for name in ("GPUQ_MANAGER_CONFIG", "GPUQ_DASHBOARD_USERS", "GPUQ_DASHBOARD_HOST"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuq.cli", "manager", "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_for_page(url, proc).status_code == 200
        deadline = time.monotonic() + 30
        while True:  # the page shows the loop's ticks and the manager's budget
            page = requests.get(url, timeout=5).text
            tick = re.search(r'id="last-tick">.*?class="value">([^<]*)<', page, re.S)
            if tick and tick[1] != "never":
                break
            assert time.monotonic() < deadline, "the page never showed a tick"
            time.sleep(0.5)
        assert "of $7.00 a day" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_gpuq_dashboard_serves_the_embedded_default_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": "", "PYTHONPATH": str(REPO), "GPUQ_DATA_DIR": str(tmp_path / "data")}
    env.pop("GPUQ_DASHBOARD_USERS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuq.cli", "dashboard", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/", proc)
        assert page.status_code == 200 and "No queue has had a job" in page.text
        assert (tmp_path / "data" / "pgdata" / "postmaster.pid").exists()  # its own Postgres is up
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # uvicorn raises SIGTERM again after its shutdown; had that killed the process, the embedded Postgres
    # would still be running (its pid file left behind)
    assert not (tmp_path / "data" / "pgdata" / "postmaster.pid").exists(), out


def test_a_taken_port_leaves_the_manager_running_without_its_page(
    db_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("GPUQ_DASHBOARD_PORT", str(taken.getsockname()[1]))
        monkeypatch.delenv("GPUQ_DASHBOARD_USERS", raising=False)
        monkeypatch.delenv("GPUQ_DASHBOARD_HOST", raising=False)
        assert start_beside_manager(db_url, settings, POLICY) is None
    assert "no dashboard: the dashboard could not listen on 127.0.0.1:" in caplog.text
    monkeypatch.delenv("GPUQ_DASHBOARD_PORT")
    assert start_beside_manager(db_url, settings, POLICY) is None  # not asked for: nothing served


# ----------------------------------------------------------------------------------------------- files


def test_users_files_are_checked_line_by_line() -> None:
    good = hash_password("a-long-password")
    assert check_password("a-long-password", good) and not check_password("a-long-passwore", good)
    assert not check_password("x", "scrypt$1$1$1$!!$!!") and not check_password("x", "plain")
    accounts = parse_users(f"\n# c\nbob:viewer:{good}\n")
    assert accounts["bob"].user.role == "viewer"
    for text, says in [
        ("", "lists no user"),
        ("bob:viewer", "expected NAME:ROLE:HASH"),
        (f"bob:admin:{good}", "viewer or operator"),
        (f"b o b:viewer:{good}", "a name is"),
        ("bob:viewer:password123", "the hash must be"),
        (f"bob:viewer:{good}\nbob:operator:{good}", "listed twice"),
    ]:
        with pytest.raises(UsersError, match=says):
            parse_users(text)


def test_the_vendored_chart_library_is_the_published_file_recorded_beside_it() -> None:
    vendor = REPO / "gpuq" / "dashboard" / "static" / "vendor"
    notes = (vendor / "README.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = hashlib.sha256((vendor / name).read_bytes()).hexdigest()
        assert digest in notes, name
    assert "MIT License" in (vendor / "uPlot.LICENSE.txt").read_text()
