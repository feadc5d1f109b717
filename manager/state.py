"""The database's side of a tick, read through gpuq's SQL functions into the policy's input types."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gpuq.client import Client
from manager.policy import InstanceState, InstanceView, QueueSnapshot, Spend


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


def read_snapshot(client: Client, budget_tz: str, label_prefix: str, *, other_dph: float = 0.0) -> Snapshot:
    """Queues, our live instances, today's spend and the machines to avoid."""
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
    instances = managed_instances(client, label_prefix)
    today = client.call("select gpuq.spend_today(%s) as usd", (budget_tz,))[0]["usd"]
    avoided = frozenset(r["m"] for r in client.call("select gpuq.avoided_machine_ids() as m"))
    return Snapshot(queues, instances, Spend(today=float(today), other_dph=other_dph), avoided)
