"""The seam between the worker loop and an inference backend (ComfyUI, F5-TTS, ...)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class JobContext:
    """Everything a backend needs for one job; the worker builds it."""

    job_id: int
    attempt: int
    queue: str
    payload: dict[str, Any]
    workdir: Path  # a scratch directory of this job's own, removed after the job
    deadline: float  # time.monotonic() value after which the job has timed out
    cancelled: threading.Event  # set on cancel, timeout or lost lease: stop soon
    report_progress: Callable[[int, str | None], None]  # (percent 0..100, message)
    fetch_input: Callable[[str], Path]  # URL or path in the payload -> local file (limits applied)


@dataclass
class OutputFile:
    path: Path  # a file in the job's workdir
    content_type: str  # e.g. "image/png", "audio/wav"
    name: str  # a plain file name, used in the storage key


@dataclass
class BackendResult:
    outputs: list[OutputFile]
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. inference_seconds, audio_seconds


class Backend(Protocol):
    name: str  # "comfyui", "f5tts", ...

    def start(self) -> None:
        """Get ready (load models, wait for or start a server). Raise JobError(BACKEND_UNAVAILABLE)."""

    def run(self, ctx: JobContext) -> BackendResult:
        """Run one job. Raise JobError with a taxonomy code on failure; return when done or cancelled."""

    def healthy(self) -> bool:
        """Cheap liveness probe, called between jobs."""

    def close(self) -> None:
        """Release what start() took (child processes, GPU memory)."""
