"""The worker as real processes against real Postgres: `python -c "from worker.cli import main; ..."`
started with environment variables as the manager starts it, jobs enqueued through gpuq's SQL API,
outputs read back from storage, signals sent by PID."""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import requests
from PIL import Image
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gpuq.client import Client
from gpuq.settings import Settings
from tests.standins.comfyui import ComfyUIStandIn
from tests.standins.supabase_storage import SupabaseStorageStandIn
from tests.standins.tcp_proxy import TcpProxy
from worker.config import ConfigError, WorkerSettings, parse_concurrency, parse_queues
from worker.storage.supabase import SupabaseStorage

REPO = Path(__file__).resolve().parents[2]
WORKER = ["-c", "import sys; from worker.cli import main; sys.exit(main())"]
FAULTY = [str(REPO / "tests" / "procs" / "worker_faulty.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def make_png(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    image = Image.new("RGB", size, (10, 20, 30))
    image.putpixel((0, 0), (200, 100, 0))
    image.save(path)
    return path


class WorkerProc:
    def __init__(
        self, proc: subprocess.Popen[str], instance_id: int | None, secret: str, log_path: Path
    ) -> None:
        self.proc = proc
        self.instance_id = instance_id  # None until a self-enrolled worker has registered
        self.secret = secret  # the secret it was started with ("" when it enrolled itself)
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def start_worker(db_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    started: list[WorkerProc] = []

    def start(
        queues: str = "demo=imageops",
        *,
        lease: int = 30,
        grace: float = 5.0,
        argv: list[str] | None = None,
        wait_ready: bool = True,
        enrolled: bool = True,
        vram_mb: int = 0,
        **env: str,
    ) -> WorkerProc:
        """A worker process; by default for an instance enrolled here as an operator would (`gpuq enroll`),
        with its secret in the environment; enrolled=False: it enrolls itself (the owner's login)."""
        key = f"w{len(started)}-{secrets.token_hex(3)}"
        log_path = tmp_path / f"worker-{key}.log"
        instance_id, secret = None, ""
        if enrolled:
            names = [q.split("=")[0].strip() for q in queues.split(",") if q.strip()]
            with Client.connect(db_url, Settings(db_url, tmp_path, False, 60, 0.1)) as admin:
                instance_id, secret = admin.enroll(names, max_concurrency=64, vram_mb=vram_mb)
            env = {"GPUQ_INSTANCE_SECRET": secret, **env}
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DATABASE_URL": db_url,
            "GPUQ_QUEUES": queues,
            "GPUQ_DATA_DIR": str(tmp_path / "data"),
            "GPUQ_STORAGE_URL": str(tmp_path / "outputs"),
            "GPUQ_INPUT_DIRS": str(tmp_path),  # the tests' input files lie there
            "GPUQ_PROVIDER": "local",
            "GPUQ_PROVIDER_INSTANCE_ID": key,
            "GPUQ_LEASE_SECONDS": str(lease),
            "GPUQ_POLL_SECONDS": "0.5",
            "GPUQ_DRAIN_GRACE_SECONDS": str(grace),
            "GPUQ_SPOT_WATCH": "0",
            **env,
        }
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, *(argv or WORKER)],
                cwd=tmp_path,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        w = WorkerProc(proc, instance_id, secret, log_path)
        started.append(w)
        if wait_ready:

            def registered() -> bool:
                assert proc.poll() is None, f"worker exited with {proc.returncode}:\n{w.log}"
                found = re.search(r"registered as instance (\d+)", w.log)
                if found:
                    w.instance_id = int(found[1])
                return found is not None

            wait_for(registered, 30, "the worker to register")
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()  # by PID: only the processes this test started
            w.proc.wait(10)


def instance_row(client: Client, w: WorkerProc) -> dict[str, Any]:
    row = client.conn.execute("select * from gpuq.instances where id = %s", (w.instance_id,)).fetchone()
    assert row is not None
    return row


def wait_status(client: Client, job_id: int, status: str, timeout: float = 20.0) -> Any:
    return wait_for(
        lambda: (j := client.get(job_id)).status == status and j, timeout, f"job {job_id} to be {status}"
    )


def events(client: Client, job_id: int) -> list[str]:
    return [e["event"] for e in client.history(job_id)]


def output_file(url: str) -> Path:
    assert url.startswith("file://"), url
    return Path(urlsplit(url).path)


# --- end to end --------------------------------------------------------------------------------------


def test_imageops_job_runs_end_to_end_into_local_storage(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    w = start_worker("demo=imageops")
    assert "demo -> imageops (concurrency 1)" in w.log  # the start-up summary
    assert str(tmp_path / "outputs") in w.log
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "invert"}], "format": "png"})
    job = client.wait(job_id, timeout=20)
    assert job.status == "succeeded", (job.error_code, job.error_message, w.log)
    assert job.attempt == 1
    assert job.result is not None
    [out] = job.result["outputs"]
    assert out["name"] == "output.png" and out["content_type"] == "image/png"
    path = output_file(out["url"])
    assert path.is_relative_to(tmp_path / "outputs")
    assert re.search(rf"demo/\d{{4}}-\d\d-\d\d/{job_id}/1/output.png$", str(path))  # attempt 1
    assert out["bytes"] == path.stat().st_size
    with Image.open(path) as img:
        assert img.getpixel((0, 0)) == (55, 155, 255)  # inverted (200, 100, 0)
        assert img.getpixel((1, 1)) == (245, 235, 225)
    metrics = job.result["metrics"]
    for key in ("claim_seconds", "fetch_seconds", "inference_seconds", "upload_seconds"):
        assert isinstance(metrics[key], float) and metrics[key] >= 0, key
    assert not list((tmp_path / "data" / "work").glob("*"))  # the job's workdir is gone

    row = instance_row(client, w)
    assert row["queues"] == ["demo"] and row["version"] and row["hostname"]
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
    row = instance_row(client, w)
    assert row["status"] == "terminated" and row["terminated_at"] is not None
    assert "SIGTERM" in (row["end_reason"] or "")


def test_comfyui_job_runs_end_to_end_through_the_standin(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    with ComfyUIStandIn(tmp_path / "comfy", port=free_port()) as comfy:
        w = start_worker("images=comfyui", COMFYUI_URL=comfy.url)
        job_id = client.enqueue("images", {"workflow": "image_invert", "image": str(src)})
        job = client.wait(job_id, timeout=30)
        assert job.status == "succeeded", (job.error_code, job.error_message, w.log)
        [out] = job.result["outputs"]  # type: ignore[index]
        assert out["content_type"] == "image/png"
        with Image.open(output_file(out["url"])) as img:
            got = img.getpixel((0, 0))[:3]  # ComfyUI inverts in float32: off by one at most
            assert all(abs(a - b) <= 1 for a, b in zip(got, (55, 155, 255), strict=True)), got
        assert job.result["metrics"]["workflow"] == "image_invert"  # type: ignore[index]
        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0


# --- drain, crash, cancel ----------------------------------------------------------------------------


def test_sigterm_finishes_a_short_job_within_grace_and_releases_a_long_one_without_using_an_attempt(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    w = start_worker("demo=imageops", grace=2.0, GPUQ_CONCURRENCY="imageops=2")
    short = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 1.0}]})
    long = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 120}]})
    wait_status(client, short, "running")
    wait_status(client, long, "running")
    sent = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0, w.log
    assert time.monotonic() - sent < 10  # the long job's backend was stopped, not waited for

    assert client.get(short).status == "succeeded"
    released = client.get(long)
    assert released.status == "queued"
    assert (released.attempt, released.releases) == (1, 1)  # attempt - releases: no attempt used
    assert events(client, long) == ["released"]
    assert instance_row(client, w)["status"] == "terminated"
    drained = client.conn.execute(
        "select event, message from gpuq.instance_events where instance_id = %s order by id",
        (instance_row(client, w)["id"],),
    ).fetchall()
    assert [e["event"] for e in drained] == ["enrolled", "registered", "draining", "deregistered"]

    # it runs to completion on the next worker, as attempt 2 of which only one is used
    client.conn.execute(  # a test's shortcut: no app edits a queued job's payload
        "update gpuq.jobs set payload = jsonb_set(payload, '{ops,0,seconds}', '0') where id = %s", (long,)
    )
    w2 = start_worker("demo=imageops")
    job = client.wait(long, timeout=20)
    assert job.status == "succeeded" and job.attempt == 2 and job.attempt - job.releases == 1
    w2.signal(signal.SIGTERM)
    assert w2.wait(15) == 0


def test_a_worker_killed_mid_job_loses_it_to_another_that_finishes_it_exactly_once(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    victim = start_worker("demo=imageops", lease=3)
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 2}]})
    wait_status(client, job_id, "running")
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    assert client.get(job_id).status == "running"  # nobody said goodbye

    rescuer = start_worker("demo=imageops", lease=3)
    job = client.wait(job_id, timeout=30)
    assert job.status == "succeeded" and job.attempt == 2
    assert events(client, job_id) == ["lease_expired", "succeeded"]
    outputs = list((tmp_path / "outputs").rglob("*.png"))
    assert len(outputs) == 1 and str(job_id) in str(outputs[0])
    assert client.get(job_id).instance_id == instance_row(client, rescuer)["id"]


def test_cancelling_a_running_job_interrupts_its_backend(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    w = start_worker("demo=imageops", lease=4)  # heartbeat every second
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 300}]})
    wait_status(client, job_id, "running")
    asked = time.monotonic()
    assert client.cancel(job_id) == "running"
    job = wait_status(client, job_id, "cancelled", timeout=10)
    assert time.monotonic() - asked < 5
    assert job.error_code == "CANCELLED" and job.result is None
    assert events(client, job_id) == ["cancel_requested", "cancelled"]
    # the single slot is free again: the backend really stopped rather than sleeping on
    quick = client.enqueue("demo", {"image": str(src)})
    assert client.wait(quick, timeout=10).status == "succeeded"
    assert f"job {job_id}: stopping (cancel)" in w.log


def test_cancelling_a_running_comfyui_job_interrupts_its_prompt(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    from tests.standins.comfyui import Faults

    src = make_png(tmp_path / "in.png")
    with ComfyUIStandIn(
        tmp_path / "comfy", port=free_port(), faults=Faults(slow={"ImageInvert": 60})
    ) as comfy:
        start_worker("images=comfyui", lease=4, COMFYUI_URL=comfy.url)
        job_id = client.enqueue("images", {"workflow": "image_invert", "image": str(src)})
        wait_for(lambda: client.get(job_id).progress is not None, 20, "the prompt to start")
        client.cancel(job_id)
        job = wait_status(client, job_id, "cancelled", timeout=15)
        assert job.error_code == "CANCELLED"
        history = requests.get(f"{comfy.url}/history", timeout=5).json()
        [entry] = history.values()
        assert entry["status"]["status_str"] == "error"
        assert "execution_interrupted" in dict(entry["status"]["messages"])


def test_heartbeats_keep_a_job_past_its_lease(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    w = start_worker("demo=imageops", lease=3)
    rival = start_worker("demo=imageops", lease=3)  # would take the job if its lease lapsed
    job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 5}]})
    job = client.wait(job_id, timeout=20)
    assert job.status == "succeeded" and job.attempt == 1
    assert events(client, job_id) == ["succeeded"]
    for each in (w, rival):  # heartbeats carry the machine's figures
        metrics = instance_row(client, each)["metrics"]
        assert metrics["cpu_count"] >= 1 and metrics["ram_total_mb"] > 0, metrics


def test_a_job_past_its_timeout_is_stopped_and_fails_with_timeout(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    start_worker("demo=imageops", lease=4)
    job_id = client.enqueue(
        "demo",
        {"image": str(src), "ops": [{"op": "sleep", "seconds": 60}]},
        timeout_seconds=1,
        max_attempts=1,
    )
    job = wait_status(client, job_id, "failed", timeout=10)
    assert job.error_code == "TIMEOUT"
    assert (job.finished_at - job.started_at).total_seconds() < 5  # type: ignore[operator]


# --- errors ------------------------------------------------------------------------------------------


def test_bad_input_fails_once_with_input_invalid(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    start_worker("demo=imageops")
    bad_op = client.enqueue("demo", {"image": str(src), "ops": [{"op": "explode"}]}, max_attempts=3)
    bad_resize = client.enqueue(
        "demo", {"image": str(src), "ops": [{"op": "resize", "width": 0, "height": 5}]}
    )
    missing = client.enqueue("demo", {"image": str(tmp_path / "nope.png")})
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    garbage = client.enqueue("demo", {"image": str(not_image)})
    expected = {
        bad_op: "ops[0]: unknown op 'explode'",
        bad_resize: "ops[0] (resize): width must be between 1 and 8192, got 0",
        missing: "no such file",
        garbage: "not an image",
    }
    for job_id, message in expected.items():
        job = wait_status(client, job_id, "failed")
        assert job.error_code == "INPUT_INVALID" and job.attempt == 1
        assert message in (job.error_message or ""), job.error_message
        assert events(client, job_id) == ["failed"]


def test_inputs_outside_the_input_dirs_or_on_loopback_fail_once_and_nothing_else_is_lost(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = make_png(inputs / "in.png")
    secret = tmp_path / "worker.env"
    secret.write_text("DATABASE_URL=postgresql://worker:s3cret@db/app\n")
    (inputs / "avatar.png").symlink_to(secret)
    w = start_worker("demo=imageops", GPUQ_INPUT_DIRS=str(inputs))
    assert f"local files under {inputs}; URLs on public addresses only" in w.log

    loopback = f"http://127.0.0.1:{free_port()}/view?filename=x.png"  # where ComfyUI would answer
    refused = {
        ref: client.enqueue("demo", {"image": ref, "format": "png"}, max_attempts=3)
        for ref in ("/proc/self/environ", "file:///etc/passwd", str(inputs / "avatar.png"), loopback)
    }
    ok = client.enqueue("demo", {"image": str(good), "ops": [{"op": "invert"}], "format": "png"})
    for ref, job_id in refused.items():
        job = wait_status(client, job_id, "failed")
        assert job.error_code == "INPUT_INVALID" and job.attempt == 1, (ref, job.error_message)
        setting = "GPUQ_INPUT_ALLOW_PRIVATE=1" if ref == loopback else f"GPUQ_INPUT_DIRS (now: {inputs})"
        assert setting in (job.error_message or "") and ref.split("?")[0] in (job.error_message or "")
        assert job.result is None and events(client, job_id) == ["failed"]
    assert wait_status(client, ok, "succeeded").attempt == 1


@pytest.mark.parametrize("scheme", ["s3", "supabase"])
def test_bucket_inputs_only_from_the_output_bucket_by_default(
    scheme: str,
    request: pytest.FixtureRequest,
    aws_env: None,
    client: Client,
    start_worker: Callable[..., WorkerProc],
    tmp_path: Path,
) -> None:
    """The worker's credentials read both buckets; a payload may name only the one outputs go to."""
    png = make_png(tmp_path / "in.png")
    outputs, other = f"out-{secrets.token_hex(4)}", f"private-{secrets.token_hex(4)}"
    if scheme == "s3":
        moto_url = request.getfixturevalue("moto_url")
        s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
        for bucket in (outputs, other):
            s3.create_bucket(Bucket=bucket)
            s3.upload_file(str(png), bucket, "users/2/photo.png")
        env = {"GPUQ_S3_ENDPOINT_URL": moto_url}
    else:
        supa = request.getfixturevalue("supabase_standin")
        for bucket in (outputs, other):
            supa.create_bucket(bucket)
            SupabaseStorage(supa.url, supa.service_role_key, bucket).put(
                "users/2/photo.png", png, "image/png"
            )
        env = {"SUPABASE_URL": supa.url, "SUPABASE_SERVICE_ROLE_KEY": supa.service_role_key}
    w = start_worker("demo=imageops", GPUQ_STORAGE_URL=f"{scheme}://{outputs}/jobs", **env)
    assert f"buckets {scheme}://{outputs}\n" in w.log  # the start-up summary

    refused = f"{scheme}://{other}/users/2/photo.png"
    bad = client.enqueue("demo", {"image": refused, "format": "png"}, max_attempts=3)
    ok = client.enqueue("demo", {"image": f"{scheme}://{outputs}/users/2/photo.png", "format": "png"})
    job = client.wait(bad, timeout=20)
    assert (job.status, job.error_code, job.attempt) == ("failed", "INPUT_INVALID", 1), job.result
    assert job.result is None and events(client, bad) == ["failed"]
    assert job.error_message == (
        f"refusing input {refused}: bucket {scheme}://{other} is not in GPUQ_INPUT_BUCKETS "
        f"(now: {scheme}://{outputs})"
    )
    assert wait_status(client, ok, "succeeded").attempt == 1


@pytest.fixture
def supabase_standin() -> Iterator[SupabaseStorageStandIn]:
    with SupabaseStorageStandIn() as standin:
        yield standin


def test_input_settings_default_to_the_local_output_dir_and_refuse_clearly(tmp_path: Path) -> None:
    settings = Settings(None, tmp_path, False, 60, 1.0)
    base = {"GPUQ_QUEUES": "a=imageops", "GPUQ_SPOT_WATCH": "0"}
    ws = WorkerSettings.from_env(settings, base)
    # outputs are local: a job may take an earlier job's output, and nothing else on the machine
    assert ws.input_dirs == ((tmp_path / "outputs").resolve(),) and ws.input_allow_private is False
    assert WorkerSettings.from_env(settings, {**base, "GPUQ_STORAGE_URL": "s3://b/out"}).input_dirs == ()

    def buckets(**env: str) -> tuple[str, ...]:
        return WorkerSettings.from_env(settings, {**base, **env}).input_buckets

    # bucket inputs: the output bucket when outputs go to one (a job may take an earlier job's output)
    assert ws.input_buckets == () and buckets(GPUQ_STORAGE_URL=str(tmp_path / "out")) == ()
    assert buckets(GPUQ_STORAGE_URL="s3://media/gpuq?public=true") == ("s3://media",)
    assert buckets(GPUQ_STORAGE_URL="supabase://media") == ("supabase://media",)
    # set, it replaces the default; a bare name is both schemes' bucket
    assert buckets(
        GPUQ_STORAGE_URL="s3://media/gpuq",
        GPUQ_INPUT_BUCKETS=" uploads, supabase://avatars/ ,S3://media,uploads,",
    ) == ("s3://uploads", "supabase://uploads", "supabase://avatars", "s3://media")
    assert buckets(GPUQ_STORAGE_URL="s3://media/gpuq", GPUQ_INPUT_BUCKETS="s3://uploads") == ("s3://uploads",)

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ws = WorkerSettings.from_env(
        settings,
        {**base, "GPUQ_INPUT_DIRS": f"{a}{os.pathsep}{b}{os.pathsep}", "GPUQ_INPUT_ALLOW_PRIVATE": "yes"},
    )
    assert ws.input_dirs == (a.resolve(), b.resolve()) and ws.input_allow_private is True
    for env, message in (
        ({"GPUQ_INPUT_DIRS": "inputs"}, "GPUQ_INPUT_DIRS entries must be absolute paths, got 'inputs'"),
        (
            {"GPUQ_INPUT_DIRS": str(tmp_path / "nope")},
            f"GPUQ_INPUT_DIRS: {tmp_path / 'nope'} is not a directory",
        ),
        (
            {"GPUQ_INPUT_ALLOW_PRIVATE": "maybe"},
            "GPUQ_INPUT_ALLOW_PRIVATE must be true or false, got 'maybe'",
        ),
        (
            {"GPUQ_INPUT_BUCKETS": "gs://media"},
            "GPUQ_INPUT_BUCKETS: 'gs://media' is not s3://bucket, supabase://bucket or a bare bucket name",
        ),
        *(
            (
                {"GPUQ_INPUT_BUCKETS": f"uploads,{item}"},
                "GPUQ_INPUT_BUCKETS entries are whole buckets (letters, digits, . _ -), "
                f"optionally s3:// or supabase://; got {item!r}",
            )
            for item in ("s3://media/users/2", "media/users", "s3://", "user@media")
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            WorkerSettings.from_env(settings, {**base, **env})


def test_an_unexpected_backend_exception_is_worker_error_with_the_traceback_in_history_only(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    start_worker("demo=faulty", argv=FAULTY)
    job_id = client.enqueue("demo", {"explode": True}, max_attempts=1)
    job = wait_status(client, job_id, "failed")
    assert job.error_code == "WORKER_ERROR"
    assert job.error_message == "KeyError: 'missing-key'"
    assert job.result is None
    [failed] = [e for e in client.history(job_id) if e["event"] == "failed"]
    assert "Traceback (most recent call last)" in failed["details"]["traceback"]
    assert "worker_faulty.py" in failed["details"]["traceback"]
    assert "Traceback" not in json.dumps(client.get(job_id).result)


def test_a_backend_error_with_a_nul_in_its_text_still_ends_the_job_with_its_message(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    """Postgres text cannot hold U+0000: unless the report is made storable, fail_job is refused and the job
    stays running until its lease passes."""
    from tests.standins.comfyui import Faults

    src = make_png(tmp_path / "in.png")
    faults = Faults(error_in="ImageInvert", error_message="read a NUL (\x00) from the model file")
    with ComfyUIStandIn(tmp_path / "comfy", port=free_port(), faults=faults) as comfy:
        start_worker("images=comfyui", COMFYUI_URL=comfy.url)
        job_id = client.enqueue("images", {"workflow": "image_invert", "image": str(src)}, max_attempts=1)
        job = wait_status(client, job_id, "failed")
    said = "ImageInvert (node 2) raised RuntimeError: read a NUL (\ufffd) from the model file"
    assert (job.error_code, job.error_message) == ("BACKEND_ERROR", said)
    assert events(client, job_id) == ["failed"]


def test_a_retryable_error_is_retried(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    start_worker("demo=faulty", argv=FAULTY)
    job_id = client.enqueue("demo", {"explode": True}, max_attempts=2)
    job = wait_for(
        lambda: (j := client.get(job_id)).status == "queued" and j.attempt == 1 and j, 20, "a retry"
    )
    assert job.error_code == "WORKER_ERROR"
    assert events(client, job_id) == ["retry_scheduled"]


# --- spot, metrics, configuration --------------------------------------------------------------------


class FakeIMDS(http.server.ThreadingHTTPServer):
    """IMDSv2 as AWS answers it: a token from PUT /latest/api/token, then instance-action 404 until
    the notice is posted."""

    def __init__(self, notice_after: int) -> None:
        self.gets = 0
        self.notice_after = notice_after
        self.tokens_seen: list[str | None] = []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(http.server.BaseHTTPRequestHandler):
        server: FakeIMDS

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                self._send(200, "TOKEN-123")
            else:
                self._send(400, "")

        def do_GET(self) -> None:
            self.server.tokens_seen.append(self.headers.get("X-aws-ec2-metadata-token"))
            if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN-123":
                self._send(401, "")
            elif self.path != "/latest/meta-data/spot/instance-action":
                self._send(404, "")
            else:
                self.server.gets += 1
                if self.server.gets <= self.server.notice_after:
                    self._send(404, "Not Found")
                else:
                    self._send(200, json.dumps({"action": "terminate", "time": "2026-01-01T00:02:00Z"}))


def test_a_spot_interruption_notice_drains_the_worker(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    imds = FakeIMDS(notice_after=3)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    try:
        src = make_png(tmp_path / "in.png")
        host, port = imds.server_address[:2]
        w = start_worker(
            "demo=imageops",
            grace=1.0,
            GPUQ_SPOT_WATCH="1",
            GPUQ_SPOT_METADATA_URL=f"http://{host!s}:{port}",
            GPUQ_SPOT_POLL_SECONDS="0.5",
            wait_ready=True,
        )
        job_id = client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 120}]})
        assert w.wait(30) == 0, w.log  # it drained and left by itself
        assert imds.gets == 4 and set(imds.tokens_seen) == {"TOKEN-123"}
        job = client.get(job_id)
        assert job.status == "queued" and job.releases == 1
        row = instance_row(client, w)
        assert row["status"] == "terminated" and "spot interruption notice: terminate" in row["end_reason"]
    finally:
        imds.shutdown()
        imds.server_close()


def test_the_metrics_endpoint_counts_jobs_and_claims(
    client: Client, start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    src = make_png(tmp_path / "in.png")
    port = free_port()
    start_worker("demo=imageops", GPUQ_METRICS_PORT=str(port), GPUQ_METRICS_HOST="127.0.0.1")
    ok = client.enqueue("demo", {"image": str(src)})
    bad = client.enqueue("demo", {"image": str(src), "format": "gif"})
    assert client.wait(ok, timeout=20).status == "succeeded"
    assert client.wait(bad, timeout=20).status == "failed"
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'gpuq_worker_jobs_total{outcome="succeeded",queue="demo"} 1.0' in text
    assert 'gpuq_worker_jobs_total{outcome="failed",queue="demo"} 1.0' in text
    assert 'gpuq_worker_claimed_jobs_total{queue="demo"} 2.0' in text
    assert re.search(r'gpuq_worker_claims_total\{backend="imageops"\} [1-9]', text)
    assert 'gpuq_worker_phase_seconds_count{phase="upload",queue="demo"} 1.0' in text
    assert 'gpuq_worker_slots{backend="imageops"} 1.0' in text


def test_an_idle_worker_no_manager_looks_after_ends_its_machine(
    start_worker: Callable[..., WorkerProc], client: Client, tmp_path: Path
) -> None:
    # A rented machine whose manager stopped ticking (cron gone, host down) would bill for nothing:
    # once it has had no job and seen no tick for the orphan timeout, the worker deregisters and runs
    # the command that ends the machine.
    marker = tmp_path / "terminated"
    client.record_tick()
    client.conn.execute("update gpuq.manager_ticks set last_tick_at = now() - interval '1 hour'")
    w = start_worker(
        lease=4,
        GPUQ_ORPHAN_TIMEOUT_SECONDS="3",
        GPUQ_SELF_TERMINATE_CMD=f"echo ended > {marker}",
    )
    assert w.wait(30) == 0
    assert marker.read_text() == "ended\n"
    row = instance_row(client, w)
    assert row["status"] == "terminated" and "orphaned: no manager tick for" in row["end_reason"]
    assert "GPUQ_SELF_TERMINATE_CMD exited with 0" in w.log


def test_a_worker_whose_manager_ticks_or_who_has_work_stays(
    start_worker: Callable[..., WorkerProc], client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "terminated"
    client.record_tick()
    w = start_worker(
        lease=4, GPUQ_ORPHAN_TIMEOUT_SECONDS="3", GPUQ_SELF_TERMINATE_CMD=f"echo ended > {marker}"
    )
    # The manager ticks: idle as it is, the worker stays.
    end = time.monotonic() + 6
    while time.monotonic() < end:
        client.record_tick()
        time.sleep(0.5)
    assert w.proc.poll() is None and not marker.exists()
    # The manager goes quiet while jobs keep the worker busy: it stays too (the work pays for it).
    src = make_png(tmp_path / "in.png")
    jobs = [
        client.enqueue("demo", {"image": str(src), "ops": [{"op": "sleep", "seconds": 1}]}) for _ in range(6)
    ]
    client.conn.execute("update gpuq.manager_ticks set last_tick_at = now() - interval '1 hour'")
    for job in jobs:
        wait_status(client, job, "succeeded")
    assert w.proc.poll() is None and not marker.exists()
    # Then nothing comes: after the timeout it ends the machine.
    assert w.wait(30) == 0
    assert marker.exists()


def test_a_worker_that_loses_its_database_ends_its_machine(
    start_worker: Callable[..., WorkerProc], client: Client, db_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "terminated"
    client.record_tick()  # the manager is fine: only the lost database can end this worker
    info = conninfo_to_dict(db_url)
    proxy = TcpProxy((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    try:
        via_proxy = make_conninfo(db_url, host="127.0.0.1", port=str(proxy.port))
        w = start_worker(
            lease=4,
            DATABASE_URL=via_proxy,
            GPUQ_ORPHAN_TIMEOUT_SECONDS="3",
            GPUQ_SELF_TERMINATE_CMD=f"echo ended > {marker}",
        )
        time.sleep(1)
        assert w.proc.poll() is None  # the database answers, the manager never ticked, not idle 3 s yet
        proxy.close()
        assert w.wait(30) == 0
        assert marker.exists()
        assert "orphaned: the database has not answered for" in w.log
    finally:
        proxy.close()


def test_orphan_settings_are_checked(tmp_path: Path) -> None:
    settings = Settings(None, tmp_path, False, 60, 1.0)
    base = {"GPUQ_QUEUES": "a=imageops", "GPUQ_SPOT_WATCH": "0"}
    assert WorkerSettings.from_env(settings, base).orphan_timeout_seconds == 0  # off unless asked for
    with pytest.raises(ConfigError, match="GPUQ_ORPHAN_TIMEOUT_SECONDS needs GPUQ_SELF_TERMINATE_CMD"):
        WorkerSettings.from_env(settings, base | {"GPUQ_ORPHAN_TIMEOUT_SECONDS": "3600"})
    with pytest.raises(ConfigError, match="must not be negative"):
        WorkerSettings.from_env(
            settings, base | {"GPUQ_ORPHAN_TIMEOUT_SECONDS": "-1", "GPUQ_SELF_TERMINATE_CMD": "true"}
        )


def test_bad_configuration_stops_the_worker_with_a_clear_message(
    start_worker: Callable[..., WorkerProc],
) -> None:
    w = start_worker("demo=imageops", lease=10, wait_ready=False, GPUQ_HEARTBEAT_SECONDS="5")
    assert w.wait(30) == 2
    assert "GPUQ_HEARTBEAT_SECONDS=5 is too slow for GPUQ_LEASE_SECONDS=10" in w.log
    w = start_worker("demo=nosuch", wait_ready=False)
    assert w.wait(30) == 2
    assert "unknown backend 'nosuch'" in w.log


def test_worker_settings_parse_and_refuse_clearly(tmp_path: Path) -> None:
    assert parse_queues("images=comfyui, tts=f5tts") == {"images": "comfyui", "tts": "f5tts"}
    assert parse_concurrency("comfyui=3", {"comfyui", "f5tts"}) == {"comfyui": 3, "f5tts": 1}
    for raw, message in (
        ("images", "entries are queue=backend"),
        ("Images=comfyui", "not a valid queue name"),
        ("a=comfyui,a=f5tts", "names queue 'a' twice"),
        ("", "GPUQ_QUEUES is not set"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_queues(raw)
    with pytest.raises(ConfigError, match="comfyui='x' is not a whole number"):
        parse_concurrency("comfyui=x", {"comfyui"})
    with pytest.raises(ConfigError, match="between 1 and 256"):
        parse_concurrency("comfyui=0", {"comfyui"})

    settings = Settings(None, tmp_path, False, 60, 1.0)
    ws = WorkerSettings.from_env(settings, {"GPUQ_QUEUES": "tts=f5tts", "GPUQ_SPOT_WATCH": "0"})
    assert ws.heartbeat_seconds == 15 and ws.storage_url == str(tmp_path / "outputs")
    assert ws.provider == "local" and ws.provider_instance_id.endswith(f"-{os.getpid()}")
    vast = WorkerSettings.from_env(
        settings, {"GPUQ_QUEUES": "tts=f5tts", "GPUQ_PROVIDER": "vast", "CONTAINER_ID": "C.123"}
    )
    assert vast.provider_instance_id == "C.123" and vast.spot_watch is False
    aws = WorkerSettings.from_env(settings, {"GPUQ_QUEUES": "tts=f5tts", "GPUQ_PROVIDER": "aws_spot"})
    assert aws.spot_watch is True
    with pytest.raises(ConfigError, match="GPUQ_PROVIDER must be a lowercase name"):
        WorkerSettings.from_env(settings, {"GPUQ_QUEUES": "a=imageops", "GPUQ_PROVIDER": "AWS"})
    with pytest.raises(ConfigError, match="GPUQ_METRICS_PORT must be a whole number"):
        WorkerSettings.from_env(settings, {"GPUQ_QUEUES": "a=imageops", "GPUQ_METRICS_PORT": "x"})
