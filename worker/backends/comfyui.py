"""The ComfyUI backend: runs a workflow from `workflows/` on a ComfyUI server for each job.

The server is either one at COMFYUI_URL (waited for until it answers) or one this backend starts from
COMFYUI_DIR (`python main.py --listen 127.0.0.1 --port N`) and restarts when it has died.

For one job: the payload names a workflow and gives its fields (`worker.workflows` checks them); image
fields are fetched with ctx.fetch_input, checked to be images and uploaded; the graph is submitted with
a client_id and an output prefix of the job's own; progress is followed on the websocket, and
`/history` is polled whenever the socket is silent or gone; the output files are fetched with /view.

Failures: a rejected graph is INPUT_INVALID when the node input at fault is fed by a payload field,
BACKEND_UNAVAILABLE when it names a model file the server lacks, WORKFLOW_INVALID otherwise; an error
while running is GPU_OOM for out-of-memory, BACKEND_ERROR otherwise; a server that cannot be reached
(or dies, or forgets the prompt on restart) is BACKEND_UNAVAILABLE. Cancelling or timing out interrupts
this job's prompt only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import websocket

from worker import workflows
from worker.backends.base import BackendResult, JobContext, OutputFile
from worker.errors import ErrorCode, JobError
from worker.inputs import DEFAULT_IMAGE_LIMITS, ImageLimits, check_image
from worker.workflows import Workflow

log = logging.getLogger(__name__)

_OOM_MARKERS = ("out of memory", "outofmemoryerror", "ran out of memory", "allocation on device")


def _unavailable(message: str) -> JobError:
    return JobError(ErrorCode.BACKEND_UNAVAILABLE, message)


class _Unreachable(Exception):
    """The server did not answer (refused, reset, timed out)."""


class ComfyUIBackend:
    name = "comfyui"

    def __init__(
        self,
        url: str | None = None,
        comfy_dir: str | Path | None = None,
        *,
        workflows_dir: str | Path = workflows.DEFAULT_DIR,
        port: int = 8188,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 600.0,
        request_timeout: float = 30.0,
        stall_timeout: float = 20.0,
        poll_interval: float = 2.0,
        unavailable_timeout: float = 60.0,
        cancel_grace: float = 15.0,
        progress_interval: float = 2.0,
        base_dir: str | Path | None = None,
        image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
    ) -> None:
        """`url` of a running ComfyUI, or `comfy_dir` of one to start (then on 127.0.0.1:`port`).

        base_dir: the running server's base directory (its input/ and output/), so that each job's
        uploads and outputs are removed after it; with `comfy_dir` it is that directory.

        stall_timeout: socket silence after which /history is polled every `poll_interval` seconds.
        unavailable_timeout: how long the server may fail to answer mid-job before the job fails.
        cancel_grace: how long to wait for an interrupted prompt to stop before giving up on it.
        image_limits: the formats and pixel count an input image may have before it is uploaded.
        """
        if (url is None) == (comfy_dir is None):
            raise ValueError("give exactly one of url (a running ComfyUI) and comfy_dir (one to start)")
        self.comfy_dir = Path(comfy_dir) if comfy_dir is not None else None
        self.base_dir = self.comfy_dir or (Path(base_dir) if base_dir else None)
        self.url = (url or f"http://127.0.0.1:{port}").rstrip("/")
        self.workflows_dir = Path(workflows_dir)
        self.port = port
        self.python = python
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.poll_interval = poll_interval
        self.unavailable_timeout = unavailable_timeout
        self.cancel_grace = cancel_grace
        self.progress_interval = progress_interval
        self.image_limits = image_limits
        self.session = requests.Session()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> ComfyUIBackend:
        """COMFYUI_URL (with COMFYUI_BASE_DIR, its base directory, to clean up after each job), or
        COMFYUI_DIR with COMFYUI_PORT (8188), COMFYUI_PYTHON and COMFYUI_ARGS (extra flags, e.g. "--cpu");
        COMFYUI_READY_TIMEOUT in seconds (600); GPUQ_IMAGE_FORMATS and GPUQ_IMAGE_MAX_PIXELS."""
        kwargs: dict[str, Any] = {
            "ready_timeout": float(env.get("COMFYUI_READY_TIMEOUT", "600")),
            "image_limits": ImageLimits.from_env(env),
        }
        if env.get("COMFYUI_DIR"):
            kwargs |= {
                "comfy_dir": env["COMFYUI_DIR"],
                "port": int(env.get("COMFYUI_PORT", "8188")),
                "python": env.get("COMFYUI_PYTHON") or sys.executable,
                "extra_args": shlex.split(env.get("COMFYUI_ARGS", "")),
            }
        elif env.get("COMFYUI_URL"):
            kwargs["url"] = env["COMFYUI_URL"]
            kwargs["base_dir"] = env.get("COMFYUI_BASE_DIR") or None
        else:
            raise ValueError("set COMFYUI_URL (a running ComfyUI) or COMFYUI_DIR (one to start)")
        return cls(**(kwargs | overrides))

    # -- the server -------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self.comfy_dir is not None and self.process is None:
                self._spawn()
            self._wait_ready()

    def healthy(self) -> bool:
        try:
            with self._lock:
                self._ensure_running()
            return self._get("/system_stats", timeout=min(5.0, self.request_timeout)).ok
        except (JobError, _Unreachable):
            return False

    def close(self) -> None:
        with self._lock:
            self._stop_process()
        self.session.close()

    def _spawn(self) -> None:
        assert self.comfy_dir is not None
        if not (self.comfy_dir / "main.py").is_file():
            raise _unavailable(f"COMFYUI_DIR {self.comfy_dir} has no main.py")
        cmd = [
            self.python,
            "main.py",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            *self.extra_args,
        ]
        log_file = open(self.comfy_dir / "gpuq-comfyui.log", "ab")  # noqa: SIM115 (the child keeps it)
        log.info("starting ComfyUI: %s (in %s)", shlex.join(cmd), self.comfy_dir)
        # Its own session, so a SIGTERM meant for the worker (drain) does not kill the job it is running.
        self.process = subprocess.Popen(
            cmd, cwd=self.comfy_dir, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()

    def _stop_process(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.process = None

    def _process_exit(self) -> int | None:
        """The exit code of the ComfyUI we started, once it has exited; None while it runs (or not ours)."""
        return self.process.poll() if self.process is not None else None

    def _ensure_running(self) -> None:
        """Restart a ComfyUI of ours that has died. Caller holds the lock."""
        code = self._process_exit()
        if code is None:
            return
        self.restarts += 1
        log.warning("ComfyUI exited with code %s; restarting it (restart %d)", code, self.restarts)
        self.process = None
        self._spawn()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self._process_exit()
            if code is not None:
                raise _unavailable(f"ComfyUI exited with code {code} while starting; see {self._log_hint()}")
            try:
                if self._get("/system_stats", timeout=min(5.0, self.request_timeout)).ok:
                    return
            except _Unreachable:
                pass
            if time.monotonic() > deadline:
                raise _unavailable(f"ComfyUI at {self.url} not ready after {self.ready_timeout:.0f}s")
            time.sleep(0.2)

    def _log_hint(self) -> str:
        return str(self.comfy_dir / "gpuq-comfyui.log") if self.comfy_dir else self.url

    # -- HTTP -------------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, timeout: float | None = None, **kwargs: Any
    ) -> requests.Response:
        try:
            return self.session.request(
                method, self.url + path, timeout=timeout or self.request_timeout, **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Unreachable(f"{method} {path}: {exc}") from exc

    def _get(self, path: str, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        return self._request("GET", path, timeout, **kwargs)

    def _post(self, path: str, **kwargs: Any) -> requests.Response:
        return self._request("POST", path, **kwargs)

    # -- one job ----------------------------------------------------------------------------------

    def run(self, ctx: JobContext) -> BackendResult:
        payload = ctx.payload if isinstance(ctx.payload, dict) else {}
        wf = workflows.load_workflow(payload.get(workflows.WORKFLOW_FIELD), self.workflows_dir)
        values = workflows.validate_payload(wf, ctx.payload)
        with self._lock:
            self._ensure_running()
        tag = f"gpuq-{ctx.job_id}-{ctx.attempt}-{uuid.uuid4().hex[:8]}"
        try:
            ctx.report_progress(1, "uploading inputs")
            for field in wf.fields.values():
                if field.type == "image":
                    values[field.name] = self._upload(ctx, field.name, values[field.name], tag)
            graph = workflows.build_prompt(wf, values, f"gpuq/{tag}")
            return self._run_prompt(ctx, wf, graph, tag)
        except _Unreachable as exc:
            raise self._down(str(exc)) from exc
        finally:
            self._clean_files(tag)

    def _down(self, detail: str) -> JobError:
        if self.process is not None:  # a dropped connection is often the first sign: let it finish exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1)
        code = self._process_exit()
        if code is not None:
            return _unavailable(f"ComfyUI exited with code {code} during the job; see {self._log_hint()}")
        return _unavailable(f"ComfyUI at {self.url} is not answering ({detail})")

    def _upload(self, ctx: JobContext, field: str, ref: str, tag: str) -> str:
        path = ctx.fetch_input(ref)
        # ComfyUI decodes every frame of what it is given: the format and size are checked first.
        kind = check_image(path, self.image_limits, f"field {field!r}: {ref[:200]!r}").lower()
        name = f"{tag}-{field}.{kind}"
        with open(path, "rb") as fh:
            resp = self._post(
                "/upload/image",
                files={"image": (name, fh, mimetypes.guess_type(name)[0] or "application/octet-stream")},
                data={"overwrite": "true", "type": "input"},
            )
        if resp.status_code != 200:
            raise JobError(
                ErrorCode.BACKEND_ERROR, f"ComfyUI refused the upload of {field!r}: HTTP {resp.status_code}"
            )
        uploaded = resp.json()
        return (
            f"{uploaded['subfolder']}/{uploaded['name']}" if uploaded.get("subfolder") else uploaded["name"]
        )

    def _run_prompt(
        self, ctx: JobContext, wf: Workflow, graph: dict[str, Any], client_id: str
    ) -> BackendResult:
        prompt_id = str(uuid.uuid4())
        ws = self._connect(client_id)  # before submitting, so no event is missed
        try:
            submitted = time.time()
            started = time.monotonic()
            resp = self._post(
                "/prompt", json={"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
            )
            if resp.status_code == 400 or (resp.status_code == 200 and resp.json().get("node_errors")):
                body = resp.json()
                if resp.status_code == 200:  # queued with some outputs dropped: take it back
                    self._abandon(prompt_id)
                raise self._rejected(wf, body)
            if resp.status_code != 200:
                raise JobError(
                    ErrorCode.BACKEND_ERROR, f"POST /prompt: HTTP {resp.status_code} {resp.text[:300]}"
                )
            ctx.report_progress(5, "queued in ComfyUI")
            entry, ws = self._follow(ctx, wf, graph, prompt_id, client_id, ws)
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    ws.close()
        outputs = self._fetch_outputs(ctx, wf, entry)
        with contextlib.suppress(_Unreachable):
            self._post("/history", json={"delete": [prompt_id]})  # ComfyUI keeps history in memory
        ctx.report_progress(100, "done")
        return BackendResult(outputs=outputs, metrics=self._metrics(wf, entry, prompt_id, submitted, started))

    def _connect(self, client_id: str) -> websocket.WebSocket | None:
        ws_url = "ws" + self.url.removeprefix("http") + f"/ws?clientId={client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=min(10.0, self.request_timeout))
            ws.settimeout(0.2)
            return ws
        except (OSError, websocket.WebSocketException) as exc:
            log.warning("ComfyUI websocket %s: %s; following /history instead", ws_url, exc)
            return None

    def _abandon(self, prompt_id: str) -> None:
        """Stop this prompt, whether it is running or still queued, and nothing else."""
        with contextlib.suppress(_Unreachable):
            self._post("/interrupt", json={"prompt_id": prompt_id})
            self._post("/queue", json={"delete": [prompt_id]})

    def _follow(
        self,
        ctx: JobContext,
        wf: Workflow,
        graph: dict[str, Any],
        prompt_id: str,
        client_id: str,
        ws: websocket.WebSocket | None,
    ) -> tuple[dict[str, Any], websocket.WebSocket | None]:
        """Wait for the prompt to finish; return its history entry (and the socket, to be closed)."""
        progress = _Progress(ctx, graph, self.progress_interval)
        last_heard = time.monotonic()
        last_poll = 0.0
        unreachable_since: float | None = None
        stop_reason: ErrorCode | None = None  # CANCELLED or TIMEOUT once we interrupted
        stop_sent = 0.0
        succeeded = False
        while True:
            now = time.monotonic()
            if stop_reason is None and (ctx.cancelled.is_set() or now > ctx.deadline):
                stop_reason = ErrorCode.TIMEOUT if now > ctx.deadline else ErrorCode.CANCELLED
                stop_sent = now
                self._abandon(prompt_id)
            if stop_reason is not None and now - stop_sent > self.cancel_grace:
                raise self._stopped(stop_reason, "; ComfyUI did not confirm the interrupt")

            event = None
            if ws is not None:
                try:
                    message = ws.recv()
                    last_heard = now
                    if isinstance(message, str):
                        event = json.loads(message)
                except websocket.WebSocketTimeoutException:
                    pass
                except (OSError, websocket.WebSocketException, ValueError) as exc:
                    log.warning("ComfyUI websocket lost (%s); following /history", exc)
                    ws = None
            else:
                time.sleep(0.2)
            if event is not None and isinstance(event.get("data"), dict):
                data = event["data"]
                if data.get("prompt_id") == prompt_id:
                    kind = event.get("type")
                    if kind == "execution_success":
                        succeeded = True
                    elif kind == "execution_error":
                        if stop_reason is not None:
                            raise self._stopped(stop_reason)
                        raise self._failed(wf, data)
                    elif kind == "execution_interrupted":
                        raise self._stopped(stop_reason)
                    elif stop_reason is None:
                        progress.on_event(kind, data)

            # Poll history when the socket is gone or silent, once it has said the prompt succeeded
            # (history is written just after execution_success), and after an interrupt.
            silent = ws is None or time.monotonic() - last_heard > self.stall_timeout
            urgent = succeeded or stop_reason is not None
            if not (silent or urgent) or time.monotonic() - last_poll < (
                0.1 if urgent else self.poll_interval
            ):
                continue
            last_poll = time.monotonic()
            try:
                entry = self._history_entry(prompt_id)
                unreachable_since = None
            except _Unreachable as exc:
                if self._process_exit() is not None:
                    raise self._down(str(exc)) from exc
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self.unavailable_timeout:
                    raise self._down(str(exc)) from exc
                continue
            except JobError:
                if stop_reason is not None:  # deleted from the queue before it ran
                    raise self._stopped(stop_reason) from None
                raise
            if entry is None:
                if ws is None and stop_reason is None:
                    ws = self._connect(client_id)  # ComfyUI takes a reconnect under the same client_id
                    last_heard = time.monotonic()
                continue
            status = entry.get("status") or {}
            if stop_reason is not None:
                raise self._stopped(stop_reason)
            if status.get("status_str") == "success":
                return entry, ws
            for kind, data in status.get("messages", []):
                if kind == "execution_error":
                    raise self._failed(wf, data)
            raise self._stopped(None)

    def _history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history once it has finished; None while it is queued or running.
        Raises BACKEND_UNAVAILABLE when the server no longer knows it (it restarted)."""
        # Queue before history: ComfyUI moves a prompt from the queue to history in one step, so a prompt
        # found in neither, read in this order, is truly gone.
        queue = self._get("/queue").json()
        history = self._get(f"/history/{prompt_id}").json()
        if prompt_id in history:
            return history[prompt_id]
        items = queue.get("queue_running", []) + queue.get("queue_pending", [])
        if any(len(item) > 1 and item[1] == prompt_id for item in items):
            return None
        raise _unavailable("ComfyUI lost the prompt (it restarted mid-job)")

    def _stopped(self, reason: ErrorCode | None, note: str = "") -> JobError:
        if reason is None:  # an interrupt that was not ours (someone used /interrupt with no prompt_id)
            return JobError(ErrorCode.BACKEND_ERROR, "ComfyUI interrupted the prompt", retryable=True)
        what = "timed out" if reason is ErrorCode.TIMEOUT else "cancelled"
        return JobError(reason, f"job {what}; its ComfyUI prompt was interrupted{note}")

    def _rejected(self, wf: Workflow, body: dict[str, Any]) -> JobError:
        """Map a 400 from POST /prompt (ComfyUI's validation) onto the taxonomy."""
        error = body.get("error") or {}
        node_errors = body.get("node_errors") or {}
        summary = f"{error.get('message', 'rejected')}: {error.get('details', '')}".rstrip(": ")
        if not node_errors:
            return JobError(ErrorCode.WORKFLOW_INVALID, f"ComfyUI rejected workflow {wf.name!r}: {summary}")
        models = {m.name: m for m in wf.models}
        bound = wf.bound_inputs()
        missing_models: list[str] = []
        lost_uploads: list[str] = []
        bad_fields: list[str] = []
        bad_nodes: list[str] = []
        for node_id, entry in node_errors.items():
            for err in entry.get("errors", []):
                extra = err.get("extra_info") or {}
                input_name = extra.get("input_name")
                said = f"{err.get('message')}: {err.get('details')}"
                where = f"{entry.get('class_type')} node {node_id} input {input_name}"
                field = bound.get((node_id, input_name))
                if err.get("type") == "value_not_in_list" and extra.get("received_value") in models:
                    model = models[extra["received_value"]]
                    missing_models.append(f"{model.path} (from {model.url})")
                elif field is not None and wf.fields[field].type == "image":
                    lost_uploads.append(f"field {field!r}: {said}")  # we uploaded it: the server lost it
                elif field is not None:
                    bad_fields.append(f"field {field!r}: {said} ({where})")
                else:
                    bad_nodes.append(f"{where}: {said}")
        details = {"node_errors": node_errors}
        if missing_models:
            return JobError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"this ComfyUI lacks model files for {wf.name!r}: {', '.join(missing_models)}",
                details=details,
            )
        if bad_nodes:
            return JobError(
                ErrorCode.WORKFLOW_INVALID,
                f"ComfyUI rejected workflow {wf.name!r}: {'; '.join(bad_nodes)}",
                details=details,
            )
        if bad_fields:
            return JobError(ErrorCode.INPUT_INVALID, "; ".join(bad_fields), details=details)
        return JobError(
            ErrorCode.BACKEND_ERROR,
            f"ComfyUI lost an uploaded input: {'; '.join(lost_uploads)}",
            retryable=True,
            details=details,
        )

    def _failed(self, wf: Workflow, data: dict[str, Any]) -> JobError:
        """Map an execution_error event (or history message) onto the taxonomy."""
        message = str(data.get("exception_message", "")).strip()
        exc_type = str(data.get("exception_type", ""))
        node = f"{data.get('node_type')} (node {data.get('node_id')})"
        details = {
            "node_id": data.get("node_id"),
            "node_type": data.get("node_type"),
            "exception_type": exc_type,
            "traceback": (data.get("traceback") or [])[-3:],
        }
        first_line = message.splitlines()[0] if message else exc_type
        haystack = f"{exc_type} {message}".lower()
        if any(marker in haystack for marker in _OOM_MARKERS):
            return JobError(ErrorCode.GPU_OOM, f"{node} ran out of GPU memory: {first_line}", details=details)
        image_fields = [f for (node_id, _), f in wf.bound_inputs().items() if node_id == data.get("node_id")]
        if exc_type.startswith("PIL.") and any(wf.fields[f].type == "image" for f in image_fields):
            return JobError(
                ErrorCode.INPUT_INVALID,
                f"field {image_fields[0]!r}: ComfyUI could not read it ({first_line})",
                details=details,
            )
        return JobError(ErrorCode.BACKEND_ERROR, f"{node} raised {exc_type}: {first_line}", details=details)

    def _fetch_outputs(self, ctx: JobContext, wf: Workflow, entry: dict[str, Any]) -> list[OutputFile]:
        files: list[OutputFile] = []
        for node_id in wf.outputs:
            for items in (entry.get("outputs", {}).get(node_id) or {}).values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue  # e.g. the "animated" flags beside images
                    files.append(self._download(ctx, node_id, item, {f.name for f in files}))
        if not files:
            raise JobError(
                ErrorCode.WORKFLOW_INVALID, f"workflow {wf.name!r}: its output nodes wrote no files"
            )
        return files

    def _download(self, ctx: JobContext, node_id: str, item: dict[str, Any], taken: set[str]) -> OutputFile:
        params = {
            "filename": item["filename"],
            "subfolder": item.get("subfolder", ""),
            "type": item.get("type", "output"),
        }
        name = Path(item["filename"]).name
        if name in taken:
            name = f"{node_id}-{name}"
        path = ctx.workdir / name
        with self._get("/view", params=params, stream=True) as resp:
            if resp.status_code != 200:
                raise JobError(ErrorCode.BACKEND_ERROR, f"GET /view {params}: HTTP {resp.status_code}")
            with open(path, "wb") as fh:
                for chunk in resp.iter_content(1 << 20):
                    fh.write(chunk)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return OutputFile(path=path, content_type=content_type, name=name)

    @staticmethod
    def _metrics(
        wf: Workflow, entry: dict[str, Any], prompt_id: str, submitted: float, started: float
    ) -> dict[str, Any]:
        messages = dict((entry.get("status") or {}).get("messages", []))
        stamps = {kind: data.get("timestamp") for kind, data in messages.items()}
        cached = len(messages.get("execution_cached", {}).get("nodes", []))
        metrics: dict[str, Any] = {
            "workflow": wf.name,
            "comfyui_prompt_id": prompt_id,
            "cached_nodes": cached,
        }
        start, end = stamps.get("execution_start"), stamps.get("execution_success")
        if isinstance(start, int | float) and isinstance(end, int | float):
            # ComfyUI's own timestamps (ms), so a stalled socket does not skew them.
            metrics["queue_seconds"] = round(max(0.0, start / 1000 - submitted), 3)
            metrics["inference_seconds"] = round(max(0.0, (end - start) / 1000), 3)
        else:
            metrics["inference_seconds"] = round(time.monotonic() - started, 3)
        return metrics

    def _clean_files(self, tag: str) -> None:
        """Remove the job's uploads and outputs (ComfyUI has no API for it), where its disk is known:
        left there, every job's images would fill a rented machine's disk."""
        if self.base_dir is None:
            return
        shutil.rmtree(self.base_dir / "output" / "gpuq" / tag, ignore_errors=True)
        for path in (self.base_dir / "input").glob(f"{tag}-*"):
            with contextlib.suppress(OSError):
                path.unlink()


class _Progress:
    """Turns ComfyUI's events into the job's percent: 5 when queued, 10..95 across the graph's nodes."""

    def __init__(self, ctx: JobContext, graph: dict[str, Any], interval: float) -> None:
        self.ctx = ctx
        self.graph = graph
        self.interval = interval
        self.done: set[str] = set()
        self.current: str | None = None
        self.fraction = 0.0
        self.last_percent = 5
        self.last_report = 0.0

    def on_event(self, kind: str | None, data: dict[str, Any]) -> None:
        message = None
        if kind == "execution_start":
            message = "running"
        elif kind == "execution_cached":
            self.done.update(data.get("nodes", []))
        elif kind == "executing" and data.get("node") is not None:
            if self.current is not None:
                self.done.add(self.current)
            self.current, self.fraction = str(data["node"]), 0.0
            message = f"{self.graph.get(self.current, {}).get('class_type', '?')} (node {self.current})"
        elif kind == "progress" and data.get("max"):
            self.fraction = min(1.0, float(data.get("value", 0)) / float(data["max"]))
            node = str(data.get("node", self.current))
            class_type = self.graph.get(node, {}).get("class_type", "?")
            message = f"{class_type} (node {node}) step {data.get('value')}/{data['max']}"
        else:
            return
        share = (len(self.done - {self.current}) + self.fraction) / max(1, len(self.graph))
        percent = min(95, 10 + int(85 * share))
        now = time.monotonic()
        if percent > self.last_percent and now - self.last_report >= self.interval:
            self.last_percent, self.last_report = percent, now
            self.ctx.report_progress(percent, message)
