"""What the dashboard shows, read through gpuq's SQL functions, and its controls, each one SQL transition.

Nothing here decides anything or writes a table: reads are the dashboard_* functions of 0009; controls are
operator_cancel_job, operator_retry_job, operator_drain_instance, operator_destroy_instance, pause_queue and
resume_queue, which record who acted.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import psycopg

from gpuq.client import Client, GpuqError, JobNotFound
from gpuq.settings import Settings

JOB_LIMIT = 50  # running jobs shown, and as many recently finished
DAY_READS_SECONDS = 30.0  # how often the figures read from a day of finished jobs are read again
NO_OUTCOMES = dict.fromkeys(
    ("succeeded_1h", "failed_1h", "succeeded_24h", "failed_24h", "cancelled_24h", "per_minute_1h"), 0
) | {
    "wait_p50": None,
    "run_p50": None,
    "paused_at": None,
    "paused_by": None,
    "pause_reason": None,
    "oldest_wait": None,
}
HISTORY_SINCE = "24 hours"
HISTORY_STEP = "15 minutes"


class Caps(Protocol):
    """What the page needs of the manager's policy settings (manager.policy.PolicySettings)."""

    daily_budget: float
    max_total_dph: float
    budget_tz: str


@dataclass(frozen=True)
class Budget:
    """The manager's caps, from its configuration (the same file and variables `gpuq manager` reads)."""

    daily_usd: float
    max_dph: float
    tz: str = "UTC"

    @classmethod
    def of(cls, policy: Caps) -> Budget:
        return cls(policy.daily_budget, policy.max_total_dph, policy.budget_tz)


class ControlError(Exception):
    """A control the database refused, with its words; `status` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# action -> (SQL, what the target is)
CONTROLS: dict[str, tuple[str, type]] = {
    "cancel": ("select gpuq.operator_cancel_job(%s, %s, %s)::text as outcome", int),
    "retry": ("select gpuq.operator_retry_job(%s, %s, %s)::text as outcome", int),
    "drain": ("select gpuq.operator_drain_instance(%s, %s, %s)::text as outcome", int),
    "destroy": ("select gpuq.operator_destroy_instance(%s, %s, %s)::text as outcome", int),
    "pause": ("select gpuq.pause_queue(%s, %s, %s)::text as outcome", str),
    "resume": ("select gpuq.resume_queue(%s, %s, %s)::text as outcome", str),
}


class Board:
    """One database connection, used by one thread at a time, reconnected when it breaks."""

    def __init__(self, url: str, settings: Settings, budget: Budget) -> None:
        self.url = url
        self.settings = settings
        self.budget = budget
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._day: tuple[dict[str, dict[str, Any]], list[dict[str, Any]]] | None = None
        self._day_at = 0.0

    def _call(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            if self._client is None or self._client.conn.closed or self._client.conn.broken:
                if self._client is not None:
                    self._client.close()
                self._client = Client.connect(self.url, self.settings)
            return self._client.call(sql, params)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # --- reading ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the page's tables show, as plain values. What is read from the last day's jobs
        (outcomes, failures) is read again only every DAY_READS_SECONDS: it costs what a day's jobs number."""
        money = self._call("select * from gpuq.dashboard_money(%s)", (self.budget.tz,))[0]
        instances = self._call("select * from gpuq.dashboard_instances()")
        for row in instances:
            row["gpus"] = gpu_readings(row.pop("metrics"))
        jobs = self._call("select * from gpuq.dashboard_jobs(%s)", (JOB_LIMIT,))
        now = time.monotonic()
        if self._day is None or now - self._day_at >= DAY_READS_SECONDS:
            outcomes = {r["queue"]: r for r in self._call("select * from gpuq.dashboard_queue_outcomes()")}
            failures = self._call("select * from gpuq.dashboard_failures(interval '24 hours')")
            self._day, self._day_at = (outcomes, failures), now
        outcomes, failures = self._day
        queues = {r["queue"]: r for r in self._call("select * from gpuq.dashboard_queues()")}
        for name in outcomes:  # a queue with only finished jobs is listed too
            queues.setdefault(name, {"queue": name, "queued": 0, "scheduled": 0, "running": 0})
        rows = [{**NO_OUTCOMES, **outcomes.get(name, {}), **queues[name]} for name in sorted(queues)]
        return {
            "now": self._call("select now() as t")[0]["t"],
            "budget": self.budget,
            "money": money,
            "queues": rows,
            "instances": instances,
            "running": [j for j in jobs if j["status"] == "running"],
            "finished": [j for j in jobs if j["status"] != "running"],
            "failures": failures,
            "decisions": self._call("select * from gpuq.dashboard_decisions(30)"),
            "actions": self._call("select * from gpuq.dashboard_actions(20)"),
        }

    def forget_day_reads(self) -> None:
        """After a control: read the day's figures again on the next refresh."""
        self._day = None

    def history(self) -> dict[str, Any]:
        """The charts' series over the last 24 hours: unix times, depth per queue, fleet size, $/h, $."""
        window = (HISTORY_SINCE, HISTORY_STEP)
        depth = self._call("select * from gpuq.dashboard_queue_depth(%s::interval, %s::interval)", window)
        fleet = self._call("select * from gpuq.dashboard_fleet_history(%s::interval, %s::interval)", window)
        times = [unix(r["at"]) for r in fleet]
        # the two calls ran at different now()s: the same points, a moment apart, matched by their order
        index = {t: i for i, t in enumerate(sorted({r["at"] for r in depth}))}
        queues: dict[str, list[int]] = {}
        for r in depth:
            series = queues.setdefault(r["queue"], [0] * len(times))
            if index[r["at"]] < len(times):
                series[index[r["at"]]] = int(r["depth"])
        return {
            "t": times,
            "queues": queues,
            "instances": [int(r["instances"]) for r in fleet],
            "dph": [float(r["dph"]) for r in fleet],
            "spend": [float(r["spend_usd"]) for r in fleet],
        }

    # --- acting -----------------------------------------------------------------------------------

    def act(self, actor: str, action: str, target: object, reason: str | None) -> str:
        """Run one control as `actor`; answers the outcome the database gives. Raises ControlError."""
        if action not in CONTROLS:
            raise ControlError(f"unknown action {action!r}", 404)
        sql, kind = CONTROLS[action]
        value = parse_target(target, kind)
        if reason is not None and not isinstance(reason, str):
            raise ControlError("reason must be text")
        reason = (reason or "").strip()[:500] or None
        try:
            outcome = self._call(sql, (value, actor, reason))[0]["outcome"]
        except JobNotFound as e:  # GQ404: no such job or instance
            raise ControlError(str(e), 404) from None
        except GpuqError as e:  # e.g. retrying a job that is running, a malformed queue name
            raise ControlError(str(e)) from None
        except psycopg.errors.InsufficientPrivilege:
            raise ControlError(
                "this dashboard's database login may not act (grant it gpuq_operator)", 403
            ) from None
        except psycopg.Error as e:
            raise ControlError(f"database error: {e.diag.message_primary or type(e).__name__}", 500) from e
        return "" if outcome is None else str(outcome)


def parse_target(target: object, kind: type) -> int | str:
    if kind is int:
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise ControlError("target must be a job or instance id")
        try:
            value = int(target)
        except ValueError:
            raise ControlError(f"target must be a job or instance id, got {str(target)[:40]!r}") from None
        if not 0 < value < 2**63:
            raise ControlError("target must be a positive id")
        return value
    if not isinstance(target, str) or not 0 < len(target) <= 63:
        raise ControlError("target must be a queue name")
    return target


def gpu_readings(metrics: object) -> list[dict[str, float | None]]:
    """GPU utilisation and memory from a heartbeat's metrics, which the host wrote: anything that is not a
    plain finite number is left out rather than trusted (at most 16 GPUs)."""
    gpus = metrics.get("gpus") if isinstance(metrics, dict) else None
    if not isinstance(gpus, list):
        return []
    out = []
    for g in gpus[:16]:
        if not isinstance(g, dict):
            continue
        out.append(
            {
                "util": _number(g.get("utilization_percent"), 100),
                "used_mb": _number(g.get("memory_used_mb"), 2**24),
                "total_mb": _number(g.get("memory_total_mb"), 2**24),
            }
        )
    return out


def _number(value: object, most: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 <= value <= most else None


def unix(t: datetime) -> float:
    return round(t.timestamp(), 3)
