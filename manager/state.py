"""The database's side of a tick, read through gpuq's SQL functions into the policy's input types."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg

from gpuq.client import Client, GpuqError
from gpuq.output import one_line
from manager.policy import (
    InstanceState,
    InstanceView,
    PolicySettings,
    QueueSnapshot,
    Spend,
    in_window,
    next_window_opens_at,
)

log = logging.getLogger("gpuq.manager")


@dataclass(frozen=True)
class DbInstance:
    """A live instance row (terminated_at is null), as manager_instances() answers it."""

    id: int
    provider: str
    provider_instance_id: str | None
    status: InstanceState
    dph: float
    queues: tuple[str, ...]
    label: str | None
    view: InstanceView

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DbInstance:
        state = InstanceState(row["status"])
        dph = float(row["dph"] or 0)
        queues = tuple(row["queues"] or ())
        view = InstanceView(
            id=str(row["id"]),
            provider=row["provider"],
            queues=queues,
            state=state,
            dph=dph,
            gpu_name=row["gpu_name"] or "",
            machine_id=row["machine_id"],
            created_at=row["created_at"],
            ready_at=row["ready_at"],
            last_heartbeat_at=row["last_heartbeat_at"],
            last_job_at=row["last_job_at"],
            running_jobs=int(row["running_jobs"]),
            draining_since=row["draining_since"],
        )
        return cls(
            row["id"], row["provider"], row["provider_instance_id"], state, dph, queues, row["label"], view
        )


@dataclass(frozen=True)
class Snapshot:
    queues: list[QueueSnapshot]
    instances: list[DbInstance]
    spend: Spend
    avoided: frozenset[str]

    @property
    def views(self) -> list[InstanceView]:
        return [i.view for i in self.instances]


def live_instances(client: Client) -> list[DbInstance]:
    return [DbInstance.from_row(r) for r in client.call("select * from gpuq.manager_instances()")]


def managed_instances(client: Client, label_prefix: str) -> list[DbInstance]:
    """Live rows this manager rented (its label). A worker started by hand has no label: it bills
    nothing we control, so it is neither scaled nor reconciled."""
    return [i for i in live_instances(client) if (i.label or "").startswith(label_prefix)]


def read_snapshot(
    client: Client,
    budget_tz: str,
    label_prefix: str,
    *,
    other_dph: float = 0.0,
    policy: PolicySettings | None = None,
    now: datetime | None = None,
) -> Snapshot:
    """Queues, our live instances, today's spend and the machines to avoid; with `policy` pre-warming
    (prewarm_s > 0) and `now`, each queue's forecast from its history too."""
    throughput: dict[str, dict[str, float]] = {}
    for r in client.call("select * from gpuq.manager_throughput()"):
        throughput.setdefault(r["queue"], {})[r["gpu_name"]] = float(r["jobs_per_hour"])
    queues = [
        QueueSnapshot(
            name=r["queue"],
            queued=int(r["queued"]),
            running=int(r["running"]),
            oldest_wait_s=float(r["oldest_wait_s"]),
            recent_load=float(r["recent_load"]),
            arrivals_per_hour=float(r["arrivals_per_hour"]),
            last_rent_at=r["last_rent_at"],
            throughput=throughput.get(r["queue"], {}),
        )
        for r in client.call("select * from gpuq.manager_queues()")
    ]
    # A paused queue rents nothing (the policy reads `paused`), even one with no jobs and min_instances set.
    paused = {r["queue"] for r in client.call("select queue from gpuq.paused_queues()")}
    queues = [replace(q, paused=q.name in paused) for q in queues]
    queues += [QueueSnapshot(name, 0, 0, paused=True) for name in sorted(paused - {q.name for q in queues})]
    if policy is not None and now is not None and policy.prewarm_s > 0:
        queues = with_forecasts(client, queues, policy, now)
    instances = managed_instances(client, label_prefix)
    today = client.call("select gpuq.spend_today(%s) as usd", (budget_tz,))[0]["usd"]
    avoided = frozenset(r["m"] for r in client.call("select gpuq.avoided_machine_ids() as m"))
    return Snapshot(queues, instances, Spend(today=float(today), other_dph=other_dph), avoided)


def forecast_from(policy: PolicySettings, queue: str, now: datetime) -> datetime:
    """The hour a queue's forecast is for: the next one, or, within the pre-warm lead before its window
    opens, the window's first hour (what must be ready when it opens)."""
    qp = policy.queues.get(queue)
    if qp is None or not qp.windows or in_window(qp, now):
        return now
    opens = next_window_opens_at(qp, now)
    if opens is None or (opens - now).total_seconds() > policy.prewarm_s:
        return now
    return opens


def read_forecast(client: Client, at: datetime) -> dict[str, tuple[float, float, int]]:
    """queue -> (jobs, GPU-seconds of work, days of history) expected in the hour from `at`."""
    try:
        rows = client.call("select * from gpuq.queue_forecast(%s)", (at,))
    except (GpuqError, psycopg.ProgrammingError) as exc:
        # A forecast only adds pre-warming: without one the tick must still run its caps and idle timeouts.
        log.warning("no forecast this tick (pre-warming skipped): %s", one_line(exc))
        return {}
    return {r["queue"]: (float(r["jobs"]), float(r["busy_s"]), int(r["days"])) for r in rows}


def with_forecasts(
    client: Client, queues: list[QueueSnapshot], policy: PolicySettings, now: datetime
) -> list[QueueSnapshot]:
    """The snapshots with each configured queue's forecast (a queue with jobs configured but none yet in
    this snapshot gets a row, so it can be pre-warmed)."""
    names = {q.name for q in queues}
    queues = queues + [QueueSnapshot(name, 0, 0) for name in sorted(set(policy.queues) - names)]
    cache: dict[datetime, dict[str, tuple[float, float, int]]] = {}
    out = []
    for q in queues:
        at = forecast_from(policy, q.name, now)
        if at not in cache:
            cache[at] = read_forecast(client, at)
        got = cache[at].get(q.name)
        out.append(q if got is None else replace(q, forecast_jobs=got[0], forecast_busy_s=got[1]))
    return out


def forecast_lines(queues: list[QueueSnapshot], policy: PolicySettings, now: datetime) -> list[str]:
    """What the forecast says per queue, and why it matters now (for --dry-run and status)."""
    if policy.prewarm_s <= 0:
        return []
    lines = []
    for q in queues:
        if q.name not in policy.queues:
            continue
        if q.forecast_jobs is None:
            lines.append(f"forecast {q.name}: no history yet, nothing pre-warmed")
            continue
        at = forecast_from(policy, q.name, now)
        when = "the next hour" if at == now else f"the hour from {at:%H:%M} UTC, when its window opens"
        load = (q.forecast_busy_s or 0.0) / 3600
        lines.append(
            f"forecast {q.name}: {q.forecast_jobs:.1f} jobs, {load:.2f} GPUs busy in {when} "
            f"(the same hour on past days, gpuq.queue_forecast())"
        )
    return lines


# Why an instance that is not running a job is billing, refined with the manager's settings.
def idle_by_reason(client: Client, policy: PolicySettings | None = None) -> list[dict[str, Any]]:
    """gpuq.idle_by_reason()'s rows, each reason refined: an idle instance within its queue's idle timeout
    is waiting for work; past it, the policy is holding it (break-even hold, pre-warm for a forecast, or
    its queue's minimum); outside its queue's hours it is being stopped."""
    rows = client.call("select * from gpuq.idle_by_reason()")
    now = client.call("select now() as t")[0]["t"]
    out = []
    for r in rows:
        reason = r["reason"]
        queue = (r["queues"] or [""])[0]
        qp = policy.queues.get(queue) if policy is not None else None
        if reason == "waiting for work" and qp is not None and policy is not None:
            idle_s = float(r["idle_s"])
            if not in_window(qp, now):
                if policy.prewarm_s > 0 and forecast_from(policy, queue, now) != now:
                    reason = "pre-warm: ready for its window's forecast"
                else:
                    reason = "outside its allowed hours: being stopped"
            elif idle_s < qp.idle_timeout_s:
                reason = f"waiting for work (idle timeout {_secs(qp.idle_timeout_s)})"
            elif qp.min_instances > 0:
                reason = f"its queue's minimum ({qp.min_instances})"
            elif policy.prewarm_s > 0:
                reason = "pre-warm or break-even hold: the forecast or arrivals say it is needed soon"
            elif policy.reboot_s > 0 or policy.reboot_usd > 0:
                reason = "break-even hold: reuse expected before idling costs a reboot"
            else:
                reason = "past its idle timeout: kept as the load needs it"
        out.append({**r, "reason": reason})
    return out


def record_idle(client: Client, policy: PolicySettings, tick_seconds: float) -> None:
    """Book each instance's idle time since the manager last looked to the reason it has now
    (gpuq.record_idle; `manager status` sums them). A bookkeeping failure never stops a tick."""
    rows = idle_by_reason(client, policy)
    try:
        client.call(
            "select gpuq.record_idle(%s, %s, %s)",
            (
                [r["instance_id"] for r in rows],
                [r["reason"] for r in rows],
                max(1.0, min(tick_seconds, 86400.0)),
            ),
        )
    except (GpuqError, psycopg.ProgrammingError) as exc:
        log.warning("idle time not recorded this tick: %s", one_line(exc))


def idle_hours(client: Client, budget_tz: str) -> list[dict[str, Any]]:
    """Idle instance-hours and $ per reason since midnight in the budget's time zone."""
    return client.call(
        "select reason, instances, hours, usd from gpuq.idle_hours_by_reason("
        "date_trunc('day', now() at time zone %s) at time zone %s)",
        (budget_tz, budget_tz),
    )


def status_lines(
    client: Client, policy: PolicySettings, idle: list[dict[str, Any]], hours: list[dict[str, Any]]
) -> list[str]:
    """`manager status`'s cost section: the forecast per queue, today's idle hours by reason (`hours`,
    idle_hours) and every instance not running a job with its reason (`idle`, idle_by_reason)."""
    now = client.call("select now() as t")[0]["t"]
    lines = []
    if policy.prewarm_s > 0:
        queues = with_forecasts(client, [], policy, now)
        lines += forecast_lines(queues, policy, now)
    lines.append(f"idle today ({policy.budget_tz}) by reason  (select * from gpuq.idle_hours_by_reason(…))")
    lines += [
        f"  {r['reason']}: {float(r['hours']):.2f} instance-hours, ${float(r['usd']):.4f}, "
        f"{r['instances']} instance(s)"
        for r in hours
    ] or ["  none"]
    lines.append(f"not running a job: {len(idle)} instance(s)  (select * from gpuq.idle_by_reason())")
    for r in idle:
        lines.append(
            f"  instance {r['instance_id']} ({r['provider']}:{r['provider_instance_id'] or '?'}) "
            f"{r['status']}, {_secs(float(r['idle_s']))}, ${float(r['dph'] or 0):.3f}/h: {r['reason']}"
        )
    return lines


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
