"""What the machine is and how loaded it is: GPUs through NVML (nvidia-ml-py) where present, CPU and RAM
from psutil or /proc. Every probe degrades to "unknown" rather than failing the worker."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_total_mb: int


class Probe:
    """Reads GPU, CPU and memory figures. NVML is initialised once, on first use, if importable."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._cpu_prev: tuple[int, int] | None = None
        self._init_nvml()

    def _init_nvml(self) -> None:
        try:
            import pynvml  # from the nvidia-ml-py package

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as exc:  # not installed, no driver, no GPU: all the same to us
            log.debug("NVML unavailable: %s", exc)
            self._nvml = None
            self._handles = []

    @property
    def has_nvml(self) -> bool:
        return self._nvml is not None

    def gpus(self) -> list[GpuInfo]:
        out = []
        for h in self._handles:
            try:
                name = self._nvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                out.append(GpuInfo(name, int(mem.total // (1024 * 1024))))
            except Exception as exc:
                log.debug("NVML read failed: %s", exc)
        return out

    def gpu_samples(self) -> list[dict[str, Any]]:
        out = []
        for i, h in enumerate(self._handles):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(h)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                out.append(
                    {
                        "index": i,
                        "utilization_percent": int(util.gpu),
                        "memory_used_mb": int(mem.used // (1024 * 1024)),
                        "memory_total_mb": int(mem.total // (1024 * 1024)),
                    }
                )
            except Exception as exc:
                log.debug("NVML read failed: %s", exc)
        return out

    def cpu_percent(self) -> float | None:
        """Busy share of all CPUs since the previous call (None on the first call without psutil)."""
        try:
            import psutil

            return float(psutil.cpu_percent(interval=None))
        except ImportError:
            pass
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
        with self._lock:
            prev, self._cpu_prev = self._cpu_prev, (idle, total)
        if prev is None or total <= prev[1]:
            return None
        return round(100.0 * (1 - (idle - prev[0]) / (total - prev[1])), 1)

    @staticmethod
    def memory() -> tuple[int, int] | None:
        """(used MB, total MB) of RAM."""
        try:
            import psutil

            vm = psutil.virtual_memory()
            return int((vm.total - vm.available) // 2**20), int(vm.total // 2**20)
        except ImportError:
            pass
        try:
            info = {}
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0])  # kB
            return (info["MemTotal"] - info["MemAvailable"]) // 1024, info["MemTotal"] // 1024
        except (OSError, KeyError, ValueError, IndexError):
            return None

    def sample(self) -> dict[str, Any]:
        """The metrics a heartbeat carries into gpuq.instances.metrics."""
        out: dict[str, Any] = {"cpu_count": os.cpu_count()}
        cpu = self.cpu_percent()
        if cpu is not None:
            out["cpu_percent"] = cpu
        mem = self.memory()
        if mem is not None:
            out["ram_used_mb"], out["ram_total_mb"] = mem
        gpus = self.gpu_samples()
        if gpus:
            out["gpus"] = gpus
        return out

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None
            self._handles = []
