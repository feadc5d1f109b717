"""The manager's state as Prometheus metrics, written to a file after each tick (for node_exporter's
textfile collector, fit for cron) or served over HTTP by `run`.

Each Manager has its own registry, so tests and several managers in one process never share series.
Counters are declared by their full exposed names (`…_total`), the ones dashboards query; the library
takes the suffix off the family name and puts it back on the sample.
"""

from __future__ import annotations

from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    start_http_server,
    write_to_textfile,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # "now": tick.py clears and re-sets these each tick, so a status, provider or queue that is gone
        # leaves no series behind.
        self.instances = Gauge(
            "gpuq_manager_instances",
            "instances by provider and status (not yet ended)",
            ["provider", "status"],
            registry=r,
        )
        self.dph = Gauge("gpuq_manager_dph", "$/h billing now, by provider", ["provider"], registry=r)
        self.queue_queued = Gauge(
            "gpuq_manager_queue_queued", "claimable jobs per queue", ["queue"], registry=r
        )
        self.queue_running = Gauge(
            "gpuq_manager_queue_running", "running jobs per queue", ["queue"], registry=r
        )
        self.queue_oldest_wait = Gauge(
            "gpuq_manager_queue_oldest_wait_seconds",
            "wait of the oldest claimable job per queue",
            ["queue"],
            registry=r,
        )
        self.spend_today = Gauge(
            "gpuq_manager_spend_today_usd", "$ billed since the start of the budget day", registry=r
        )
        self.daily_budget = Gauge("gpuq_manager_daily_budget_usd", "the daily budget", registry=r)
        self.max_total_dph = Gauge("gpuq_manager_max_total_dph", "the $/h cap", registry=r)
        self.unverified_destroys = Gauge(
            "gpuq_manager_unverified_destroys", "instances still listed after destroy, last tick", registry=r
        )
        self.tick_duration = Gauge(
            "gpuq_manager_tick_duration_seconds", "duration of the last tick", registry=r
        )
        self.last_tick = Gauge(
            "gpuq_manager_last_tick_timestamp_seconds", "when the last tick ended (unix time)", registry=r
        )
        self.actions = Counter("gpuq_manager_actions_total", "actions decided, by kind", ["kind"], registry=r)
        self.orphans_destroyed = Counter(
            "gpuq_manager_orphans_destroyed_total",
            "instances billing that the database did not own",
            registry=r,
        )
        self.lost = Counter("gpuq_manager_lost_total", "instances the provider stopped showing", registry=r)
        self.provider_errors = Counter(
            "gpuq_manager_provider_errors_total",
            "failed provider calls, by provider",
            ["provider"],
            registry=r,
        )
        self.ticks = Counter("gpuq_manager_ticks_total", "ticks run", registry=r)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def write(self, path: Path) -> None:
        """Atomically (the library writes a temporary file and renames it), so a collector never reads
        half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
