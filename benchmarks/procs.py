"""Processes the benchmark starts (pilot, client workers, the baseline server) and their cost.

Every process is registered with a `ProcessGroup` as soon as it exists and the group kills
whatever is still alive on exit, error or not. `ResourceMeter` samples one process's RSS
every ~50 ms on a daemon thread and reads its CPU seconds (user + system) per phase, with the
system part and the minor page faults apart: where a server's extra CPU goes (the kernel copying
bytes into sockets, pages touched for the first time, or its own code) shows there first.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from pilot.gcpolicy import allocator_environment, find_jemalloc

REPO = Path(__file__).resolve().parent.parent
_READY = re.compile(r"pilot: xDS on ([\d.]+:\d+).*?, debug on http://([\d.]+:\d+)")
SPAWN = multiprocessing.get_context("spawn")
CLASS_PUBLISH_METRIC = "pilot_class_publish_cpu_seconds"


class ProcessGroup:
    """Owns child processes; `with ProcessGroup() as group:` stops them all at the end."""

    def __init__(self) -> None:
        self._popen: list[subprocess.Popen[bytes]] = []
        self._mp: list[Any] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def popen(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        self.adopt(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Own a process started elsewhere (stopped with the rest)."""
        self._popen.append(proc)

    def spawn(self, target: Callable[..., None], *args: Any) -> tuple[Connection, Any]:
        """Start `target(conn, *args)` in a spawned process; returns our end of the pipe."""
        ours, theirs = SPAWN.Pipe()
        proc = SPAWN.Process(target=target, args=(theirs, *args), daemon=True)
        proc.start()
        theirs.close()
        self._mp.append(proc)
        return ours, proc

    def stop(self, proc: Any, grace: float = 5.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Works for Popen and mp.Process."""
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            return
        proc.join(grace)
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)

    def stop_all(self) -> None:
        for proc in [*self._popen, *self._mp]:
            with contextlib.suppress(Exception):
                self.stop(proc, grace=0 if not isinstance(proc, subprocess.Popen) else 3.0)
        self._popen.clear()
        self._mp.clear()


@dataclass
class PilotProcess:
    proc: subprocess.Popen[bytes]
    ads: str
    debug: str
    log: Path


def start_pilot(group: ProcessGroup, config_dir: Path, log: Path, timeout: float = 60.0,
                profile: Path | None = None, env_extra: dict[str, str] | None = None,
                log_level: str = "info") -> PilotProcess:
    """`python -m meshctl.cli up` on free loopback ports; waits for its "serving" line."""
    args = [sys.executable]
    if profile is not None:
        args += ["-m", "cProfile", "-o", str(profile)]
    args += ["-m", "meshctl.cli", "up", "--config-dir", str(config_dir),
             "--ads", "127.0.0.1:0", "--debug", "127.0.0.1:0", "--log-level", log_level, "--plaintext-only"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    if profile is not None:  # `up` would re-exec itself under its allocator and lose cProfile: set it here
        env = allocator_environment(env, find_jemalloc()) or env
    proc = group.popen(args, log, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _READY.search(log.read_text(errors="replace"))
        if found:
            return PilotProcess(proc, found.group(1), found.group(2), log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:]
    group.stop(proc)
    raise RuntimeError(f"pilot did not start (exit code {proc.poll()}); log tail:\n{tail}")


@dataclass(frozen=True)
class CpuSplit:
    """A process's CPU seconds in user and system mode, its minor page faults and its CPU seconds by
    thread (`thread_cpu`) (so far, or over a phase)."""

    user: float = 0.0
    system: float = 0.0
    minor_faults: int = 0
    threads: tuple[tuple[str, float], ...] = ()

    @property
    def cpu(self) -> float:
        """User plus system seconds."""
        return self.user + self.system

    def __sub__(self, other: CpuSplit) -> CpuSplit:
        before = dict(other.threads)
        threads = tuple((name, seconds - before.get(name, 0.0)) for name, seconds in self.threads)
        return CpuSplit(self.user - other.user, self.system - other.system, self.minor_faults - other.minor_faults,
                        threads)


def thread_cpu(pid: int) -> tuple[tuple[str, float], ...]:
    """CPU seconds of a process's live threads so far, added up by thread name: "main" for the
    thread whose id is the process's (pilot's event loop), the kernel's name for the others (gRPC's
    ``event_engine``; Python's own threads, such as pilot's file scans and mesh builds, carry the
    process's name). Read from `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on a CPU; clock
    ticks from `stat` where it is missing). Sorted by name; empty where unreadable. A thread that
    ended is no longer counted, so a phase's split can miss its share.

    Why: pilot's CPU per change is compared with the replay's, and the difference lives in
    different threads (the loop's per-stream work, gRPC's writes, the build in a worker thread).
    """
    found: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return ()
    for tid in tids:
        task = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{task}/comm", encoding="utf-8", errors="replace") as comm:
                name = "main" if tid == str(pid) else comm.read().strip()
            seconds = _task_seconds(task)
        except (OSError, ValueError, IndexError):
            continue
        found[name] = found.get(name, 0.0) + seconds
    return tuple(sorted(found.items()))


def _task_seconds(task: str) -> float:
    """CPU seconds of one thread (`task`: its /proc directory)."""
    try:
        with open(f"{task}/schedstat", encoding="ascii") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except FileNotFoundError:
        with open(f"{task}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (field 10 of /proc/<pid>/stat); 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[7])  # after the command: state, ppid, pgrp, session, tty, tpgid, flags, minflt


def machine_steal() -> float:
    """CPU seconds the host has taken from this machine's CPUs so far, all CPUs summed (the
    `steal` column of /proc/stat's first line); 0.0 where unreadable or not a guest.

    Why: a change that falls in a spell where the hypervisor runs someone else is slower for
    reasons neither server controls; the figure per phase says which changes met one, next to the
    clients' CPU ratio that hints at it. Resolution: one clock tick (10 ms at USER_HZ 100)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    if len(fields) < 9 or fields[0] != "cpu":
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system idle iowait irq softirq steal


def inbound_connections(proc: psutil.Process) -> int:
    """TCP connections `proc` accepted and holds: established, on a port it listens on (0 when
    it is gone)."""
    try:
        conns = proc.net_connections("tcp")
    except psutil.Error:
        return 0
    listening = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port in listening for c in conns)


class ResourceMeter:
    """Peak RSS (sampled every `interval` s) and CPU seconds of one process, per phase."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.phase_peak = 0
        self._mark = self.split()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> ResourceMeter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(2)

    def cpu(self) -> float:
        """User plus system CPU seconds so far (without `split`'s per-thread reads: it is polled)."""
        try:
            t = self.proc.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user) + float(t.system)

    def split(self) -> CpuSplit:
        """User and system CPU seconds and minor page faults so far."""
        try:
            t = self.proc.cpu_times()
        except psutil.Error:
            return CpuSplit()
        return CpuSplit(float(t.user), float(t.system), minor_faults(self.proc.pid), thread_cpu(self.proc.pid))

    def inbound_connections(self) -> int:
        """`inbound_connections` of the measured process.

        What the benchmark's clients opened (one per simulated Envoy, or one per channel of
        `streams_per_connection` streams): each costs the server gRPC's transport and read
        buffers besides its streams, so the steady RSS is read with this count beside it.
        """
        return inbound_connections(self.proc)

    def rss(self) -> int:
        try:
            return int(self.proc.memory_info().rss)
        except psutil.Error:
            return 0

    def mark(self) -> None:
        """Start a phase: CPU and phase peak are counted from now."""
        self._mark = self.split()
        self.phase_peak = self.rss()

    def phase(self) -> tuple[float, int]:
        """(CPU seconds, peak RSS bytes) since the last mark."""
        cpu, peak = self.phase_split()
        return cpu.cpu, peak

    def phase_split(self) -> tuple[CpuSplit, int]:
        """(user and system CPU seconds and minor page faults, peak RSS bytes) since the last mark."""
        self._record(self.rss())
        return self.split() - self._mark, self.phase_peak

    def _record(self, rss: int) -> None:
        self.peak_rss = max(self.peak_rss, rss)
        self.phase_peak = max(self.phase_peak, rss)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._record(self.rss())


def class_publish_cpu(debug: str, timeout: float = 10.0) -> tuple[float | None, int | None]:
    """(sum, count) of pilot's `pilot_class_publish_cpu_seconds` Summary, or (None, None) if absent.

    Read from the Prometheus text at http://<debug>/metrics; samples with labels are added up.
    A pilot that does not export it yet (or an unreachable endpoint) must not fail the run.
    """
    try:
        with urllib.request.urlopen(f"http://{debug}/metrics", timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return None, None
    return parse_class_publish(text)


def parse_class_publish(text: str) -> tuple[float | None, int | None]:
    """(sum, count) of `pilot_class_publish_cpu_seconds` in Prometheus text, or (None, None)."""
    total = _metric_sum(text, f"{CLASS_PUBLISH_METRIC}_sum")
    count = _metric_sum(text, f"{CLASS_PUBLISH_METRIC}_count")
    if total is None or count is None:
        return None, None
    return total, int(count)


def _metric_sum(text: str, name: str) -> float | None:
    """Sum of every sample of `name` (any labels) in Prometheus text format; None if there is none."""
    found: float | None = None
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name):len(name) + 1] not in (" ", "{"):
            continue
        rest = line[len(name):]
        if rest.startswith("{"):
            rest = rest.partition("}")[2]
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        found = (found or 0.0) + value
    return found


def cpu_of(processes: list[Any]) -> float:
    """Total user+system CPU seconds of processes still alive (for the client side)."""
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.Error, ValueError):
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
    return total
