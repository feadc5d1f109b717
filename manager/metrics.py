"""The manager's state as Prometheus metrics (text exposition format), written to a file after each tick
(for node_exporter's textfile collector, fit for cron) or served over HTTP by `run`."""

from __future__ import annotations

import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Labels = tuple[tuple[str, str], ...]

HELP = {
    "gpuq_manager_instances": ("gauge", "instances by provider and status (not yet ended)"),
    "gpuq_manager_dph": ("gauge", "$/h billing now, by provider"),
    "gpuq_manager_spend_today_usd": ("gauge", "$ billed since the start of the budget day"),
    "gpuq_manager_daily_budget_usd": ("gauge", "the daily budget"),
    "gpuq_manager_max_total_dph": ("gauge", "the $/h cap"),
    "gpuq_manager_queue_queued": ("gauge", "claimable jobs per queue"),
    "gpuq_manager_queue_running": ("gauge", "running jobs per queue"),
    "gpuq_manager_queue_oldest_wait_seconds": ("gauge", "wait of the oldest claimable job per queue"),
    "gpuq_manager_actions_total": ("counter", "actions decided, by kind"),
    "gpuq_manager_orphans_destroyed_total": ("counter", "instances billing that the database did not own"),
    "gpuq_manager_lost_total": ("counter", "instances the provider stopped showing"),
    "gpuq_manager_unverified_destroys": ("gauge", "instances still listed after destroy, last tick"),
    "gpuq_manager_provider_errors_total": ("counter", "failed provider calls, by provider"),
    "gpuq_manager_ticks_total": ("counter", "ticks run"),
    "gpuq_manager_tick_duration_seconds": ("gauge", "duration of the last tick"),
    "gpuq_manager_last_tick_timestamp_seconds": ("gauge", "when the last tick ended (unix time)"),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + by

    def clear(self, name: str) -> None:
        """Forget a gauge's series (e.g. a status no instance has any more)."""
        with self._lock:
            self._values.pop(name, None)

    def get(self, name: str, **labels: str) -> float | None:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())))

    def render(self) -> str:
        lines = []
        with self._lock:
            for name in sorted(self._values):
                kind, text = HELP.get(name, ("gauge", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for labels, value in sorted(self._values[name].items()):
                    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{inner}}} {value:g}" if inner else f"{name} {value:g}")
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Atomically, so a collector never reads half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.render())
        tmp.replace(path)

    def serve(self, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = metrics.render().encode()
                self.send_response(200 if self.path.startswith("/metrics") else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
