"""The one error taxonomy of DESIGN.md. `sql/` holds the same codes in `gpuq.error_codes`.

A backend or storage kind raises `JobError`; the worker turns it into `gpuq.fail_job(...)`.
Anything else that escapes is `WORKER_ERROR` (retryable), with its traceback in the job's history.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INPUT_INVALID = "INPUT_INVALID"  # the payload is wrong: never retried
    WORKFLOW_INVALID = "WORKFLOW_INVALID"  # the template or graph is wrong: never retried
    GPU_OOM = "GPU_OOM"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"  # ComfyUI down, model not loaded
    BACKEND_ERROR = "BACKEND_ERROR"  # the backend raised while running the job
    INPUT_FETCH_FAILED = "INPUT_FETCH_FAILED"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    TIMEOUT = "TIMEOUT"
    LEASE_EXPIRED = "LEASE_EXPIRED"  # set by SQL when a worker vanished
    CANCELLED = "CANCELLED"
    WORKER_ERROR = "WORKER_ERROR"  # a bug or an unexpected exception in the worker


NEVER_RETRIED = frozenset({ErrorCode.INPUT_INVALID, ErrorCode.WORKFLOW_INVALID, ErrorCode.CANCELLED})


class JobError(Exception):
    """A job failed for a reason the taxonomy names. `retryable` defaults from the code."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = code not in NEVER_RETRIED if retryable is None else retryable
        self.details = details or {}
