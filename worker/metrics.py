"""The worker's Prometheus metrics: jobs by queue and outcome, phase durations, claims, GPU gauges.

Each Worker has its own registry, so two workers in one process (tests) never share counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# From a few milliseconds (claim, complete) to half an hour (a long inference).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "gpuq_worker_jobs", "Job attempts ended by this worker", ["queue", "outcome"], registry=r
        )
        self.claims = Counter("gpuq_worker_claims", "Claim calls made", ["backend"], registry=r)
        self.claimed = Counter("gpuq_worker_claimed_jobs", "Jobs claimed", ["queue"], registry=r)
        self.phase = Histogram(
            "gpuq_worker_phase_seconds",
            "Time per job phase (claim, fetch, inference, upload, complete)",
            ["queue", "phase"],
            buckets=BUCKETS,
            registry=r,
        )
        self.running = Gauge("gpuq_worker_running_jobs", "Jobs running now", ["backend"], registry=r)
        self.slots = Gauge("gpuq_worker_slots", "Jobs this worker may run at once", ["backend"], registry=r)
        self.heartbeats = Counter("gpuq_worker_heartbeats", "Heartbeats sent", ["result"], registry=r)
        self.gpu_util = Gauge("gpuq_worker_gpu_utilization_percent", "GPU utilisation", ["gpu"], registry=r)
        self.gpu_mem_used = Gauge("gpuq_worker_gpu_memory_used_bytes", "GPU memory used", ["gpu"], registry=r)
        self.gpu_mem_total = Gauge("gpuq_worker_gpu_memory_total_bytes", "GPU memory", ["gpu"], registry=r)
        self.cpu = Gauge("gpuq_worker_cpu_percent", "CPU busy share", registry=r)
        self.ram_used = Gauge("gpuq_worker_ram_used_bytes", "RAM used", registry=r)
        self.draining = Gauge("gpuq_worker_draining", "1 while the worker drains", registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe_sample(self, sample: dict[str, Any]) -> None:
        """Copy a gpu.Probe sample into the gauges."""
        for g in sample.get("gpus", []):
            label = str(g["index"])
            self.gpu_util.labels(label).set(g["utilization_percent"])
            self.gpu_mem_used.labels(label).set(g["memory_used_mb"] * 2**20)
            self.gpu_mem_total.labels(label).set(g["memory_total_mb"] * 2**20)
        if "cpu_percent" in sample:
            self.cpu.set(sample["cpu_percent"])
        if "ram_used_mb" in sample:
            self.ram_used.set(sample["ram_used_mb"] * 2**20)
