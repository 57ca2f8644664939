"""System usage sampled in a background thread, written to ``RUN/profile/system/``.

Every ``interval`` seconds one row: CPU per core and total, I/O wait, memory, disk and network
throughput, the process tree (this process and its children: DataLoader workers), and per GPU
(when nvidia-ml-py is installed and finds one) utilisation, memory and power. Column names:

    time, cpu, cpu_core_<i>, iowait, memory, memory_used, disk_read_bps, disk_write_bps,
    net_recv_bps, net_sent_bps, proc_cpu, proc_rss, workers, workers_cpu,
    gpu<i>_util, gpu<i>_memory, gpu<i>_memory_used, gpu<i>_power

CPU figures are percentages (``proc_cpu`` and ``workers_cpu`` of one core, as ``top`` shows).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from visiontune.profile.store import SeriesWriter


class _Gpus:
    """NVML handles, or nothing when nvidia-ml-py or a driver is missing (a CPU machine) or
    when not ``enabled`` (the run does not use a GPU)."""

    def __init__(self, enabled: bool = True) -> None:
        self.handles: list[Any] = []
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:  # ImportError, or NVMLError: no driver / no device
            self.handles = []

    def sample(self, row: dict[str, Any]) -> None:
        nv = self.nvml if self.handles else None
        for i, h in enumerate(self.handles):
            try:
                row[f"gpu{i}_util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                row[f"gpu{i}_memory"] = 100.0 * mem.used / max(1, mem.total)
                row[f"gpu{i}_memory_used"] = int(mem.used)
            except Exception:
                continue
            try:
                row[f"gpu{i}_power"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:  # some boards do not report power
                pass

    def close(self) -> None:
        if self.handles:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


class SystemSampler:
    """Samples the machine every ``interval`` seconds in a daemon thread until :meth:`stop`.

    ``gpus=False`` leaves the GPUs out: a run on the CPU of a GPU machine must not be judged
    by the GPU rules (an idle GPU it never used would fire LowGPUUtilization).
    """

    def __init__(
        self, folder: Path, interval: float = 0.5, flush_seconds: float = 10.0, gpus: bool = True
    ):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.flush_seconds = flush_seconds
        self.writer = SeriesWriter(Path(folder), key="time")
        self.proc = psutil.Process(os.getpid())
        self._children: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gpus = _Gpus(enabled=gpus)
        self.samples = 0
        self.max_workers = 0

    @property
    def gpu_count(self) -> int:
        return len(self.gpus.handles)

    def start(self) -> None:
        ps = self.psutil
        # The first call of each counter only sets its baseline.
        ps.cpu_percent(percpu=True)
        ps.cpu_times_percent()
        self.proc.cpu_percent()
        self._last = (time.monotonic(), _io(ps.disk_io_counters()), _net(ps.net_io_counters()))
        self._thread = threading.Thread(target=self._run, name="visiontune-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.writer.append(self.sample())
                self.samples += 1
            except Exception:  # a vanished child or /proc hiccup must not end sampling
                continue
            if time.monotonic() - last_flush >= self.flush_seconds:
                last_flush = time.monotonic()
                try:
                    self.writer.flush()
                except OSError:
                    pass

    def sample(self) -> dict[str, Any]:
        """One row of system usage since the previous sample."""
        ps = self.psutil
        now = time.monotonic()
        per_core = ps.cpu_percent(percpu=True)
        times = ps.cpu_times_percent()
        vm = ps.virtual_memory()
        disk, net = _io(ps.disk_io_counters()), _net(ps.net_io_counters())
        t0, disk0, net0 = self._last
        self._last = (now, disk, net)
        dt = max(now - t0, 1e-6)
        row: dict[str, Any] = {
            "time": time.time(),
            "cpu": sum(per_core) / max(1, len(per_core)),
            **{f"cpu_core_{i}": v for i, v in enumerate(per_core)},
            "iowait": float(getattr(times, "iowait", 0.0)),
            "memory": vm.percent,
            "memory_used": int(vm.total - vm.available),
            "disk_read_bps": (disk[0] - disk0[0]) / dt,
            "disk_write_bps": (disk[1] - disk0[1]) / dt,
            "net_recv_bps": (net[0] - net0[0]) / dt,
            "net_sent_bps": (net[1] - net0[1]) / dt,
        }
        with self.proc.oneshot():
            row["proc_cpu"] = self.proc.cpu_percent()
            row["proc_rss"] = int(self.proc.memory_info().rss)
        workers_cpu, alive = 0.0, {}
        for child in self.proc.children(recursive=True):
            known = self._children.get(child.pid, child)
            try:
                # A new child's first reading is its baseline (0.0); it counts from the next.
                workers_cpu += known.cpu_percent()
                alive[child.pid] = known
            except ps.Error:
                continue
        self._children = alive
        row["workers"] = len(alive)
        row["workers_cpu"] = workers_cpu
        self.max_workers = max(self.max_workers, len(alive))
        self.gpus.sample(row)
        return row

    def stop(self) -> None:
        """Stop the thread and write everything out (safe to call twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval))
            self._thread = None
            # The tail since the last tick is a sample too, so even a run shorter than one
            # interval has its system usage on disk.
            try:
                self.writer.append(self.sample())
                self.samples += 1
            except Exception:
                pass
        self.writer.close()
        self.gpus.close()


def _io(c: Any) -> tuple[int, int]:
    return (c.read_bytes, c.write_bytes) if c is not None else (0, 0)


def _net(c: Any) -> tuple[int, int]:
    return (c.bytes_recv, c.bytes_sent) if c is not None else (0, 0)
