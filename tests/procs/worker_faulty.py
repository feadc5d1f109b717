"""The real worker (worker.cli.main) with one test backend added: "faulty", an imageops backend that
raises an unexpected exception (not a JobError) when the payload says {"explode": true}. It is how the
tests see a bug in a backend become WORKER_ERROR without editing the worker."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from worker import config
from worker.backends import BACKENDS
from worker.backends.base import Backend, BackendResult, JobContext
from worker.backends.imageops import ImageOpsBackend


class FaultyBackend(ImageOpsBackend):
    name = "faulty"

    def run(self, ctx: JobContext) -> BackendResult:
        if ctx.payload.get("explode"):
            return {"a": 1}["missing-key"]  # a KeyError, as a bug would raise
        return super().run(ctx)


def _faulty(env: Mapping[str, str]) -> Backend:
    return FaultyBackend()


if __name__ == "__main__":
    BACKENDS["faulty"] = _faulty
    config.KNOWN_BACKENDS = (*config.KNOWN_BACKENDS, "faulty")
    from worker.cli import main

    sys.exit(main())
