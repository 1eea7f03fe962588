"""Running one `ldit` job with its processes' memory watched, for benchmarks/bench_full_size.py.

A watcher thread reads VmHWM and VmRSS of /proc/<pid>/status of every process the job started (the
launcher, each rank, the universal converter and its workers) every 0.1 s; the children run with
MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed blocks and VmRSS falls between peaks. The job's
peak is the largest sum of its processes' VmRSS at one sample, next to the lowest MemAvailable of the
machine; os.wait4 on the launcher gives the largest single process (ru_maxrss) as a check. The children
inherit oom_score_adj 1000 from the bench (the kernel kills them first), and the watcher kills the job
when MemAvailable falls under a floor, keeping the peaks reached until then.

Imported as `full_size_watch`: `python benchmarks/bench_full_size.py` puts benchmarks/ on sys.path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
SHOWN = re.compile(r"^step \d|resumed|converted|saved checkpoint|loaded checkpoint|exported|error|Error|Killed|Traceback")  # fmt: skip


@dataclass
class Job:
    """What one `ldit` command did, as seen from outside."""

    name: str
    world: int
    rc: int = 0
    wall_s: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)
    """(s since the job started, line) of everything it printed."""
    peak_rss: dict[str, int] = field(default_factory=dict)
    """Role ("rank 0", "converter", ...) → the largest VmHWM seen (bytes)."""
    peak_sum_rss: int = 0
    min_available: int = 2**62
    largest_process: int = 0
    """ru_maxrss of the launcher's tree (os.wait4), bytes."""
    killed_for_memory: bool = False
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    """(time, {role: VmRSS}) at every sample: where in the run the peak lies."""

    def peak_between(self, role: str, t0: float | None, t1: float | None) -> int | None:
        """The largest VmRSS of `role` sampled between t0 and t1 (None: no such sample)."""
        if t0 is None or t1 is None:
            return None
        return max((r[role] for t, r in self.rss if t0 <= t <= t1 and role in r), default=None)

    def first(self, pattern: str, after: float = -1.0) -> float | None:
        """Time of the first output line containing `pattern` (after `after`), or None."""
        return next((t for t, line in self.lines if pattern in line and t > after), None)

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def child_env(world: int) -> dict[str, str]:
    threads = max(1, (os.cpu_count() or 1) // world)
    return os.environ | {
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def torch_threads(world: int) -> int:
    """torch.get_num_threads() in a process started with the ranks' environment."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=child_env(world), capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _role(p: psutil.Process, launcher: int, roles: dict[int, str]) -> str:
    if p.pid in roles:
        return roles[p.pid]
    cmd = " ".join(p.cmdline())
    parent = roles.get(p.ppid(), "")
    if "trainer.universal" in cmd and not parent.startswith("converter"):
        role = "converter"
    elif parent.startswith("converter"):
        role = "converter workers"
    elif p.ppid() == launcher and "RANK" in (env := p.environ()):
        role = f"rank {env['RANK']}"
    else:
        role = "other"
    roles[p.pid] = role
    return role


def run_job(job: Job, cmd: list[str], log_path: Path, min_available: int) -> Job:
    """Run `cmd` (an `ldit` command) with its output timed line by line, its processes' memory watched."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(job.world), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    done = threading.Event()
    roles: dict[int, str] = {proc.pid: "launcher"}

    def read() -> None:
        assert proc.stdout is not None
        with open(log_path, "w") as log:
            for line in proc.stdout:
                t = time.monotonic() - start
                job.lines.append((t, line))
                log.write(f"[{t:9.2f}] {line}")
                log.flush()
                if SHOWN.search(line):
                    print(f"  [{t:7.1f} s] {line.rstrip()[:200]}", flush=True)

    def watch() -> None:
        while not done.is_set():
            total, now = 0, {}
            try:
                procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    role, st = _role(p, proc.pid, roles), _status(p.pid)
                except (psutil.Error, OSError):
                    continue
                job.peak_rss[role] = max(job.peak_rss.get(role, 0), st.get("VmHWM", 0))
                total += st.get("VmRSS", 0)
                now[role] = now.get(role, 0) + st.get("VmRSS", 0)
            job.peak_sum_rss = max(job.peak_sum_rss, total)
            job.rss.append((time.monotonic() - start, now))
            avail = mem_available()
            job.min_available = min(job.min_available, avail)
            if avail < min_available and not job.killed_for_memory:
                job.killed_for_memory = True
                print(f"  MemAvailable {avail / GIB:.2f} GiB < {min_available / GIB:.2f} GiB: stopping the job",
                      flush=True)  # fmt: skip
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = job.rc = os.waitstatus_to_exitcode(status)
    job.wall_s = time.monotonic() - start
    job.largest_process = usage.ru_maxrss * 1024
    done.set()
    for t in threads:
        t.join(timeout=30)
    with open(log_path.with_suffix(".rss.jsonl"), "w") as f:  # the memory timeline, for a closer look
        f.writelines(json.dumps({"t": round(t, 2), **r}) + "\n" for t, r in job.rss)
    print(f"  exit {job.rc} after {job.wall_s:.1f} s; peak RSS "
          + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(job.peak_rss.items()))
          + f"; job sum {job.peak_sum_rss / GIB:.2f} GiB; min MemAvailable {job.min_available / GIB:.2f} GiB",
          flush=True)  # fmt: skip
    return job


def wait_for_machine(min_gib: float, timeout_s: float) -> None:
    """Wait (poll every 60 s, at most `timeout_s`) until no pytest runs and `min_gib` GiB are available."""
    deadline = time.monotonic() + timeout_s
    while True:
        tests = [
            p.pid for p in psutil.process_iter(["cmdline"]) if "pytest" in " ".join(p.info["cmdline"] or [])
        ]
        avail = mem_available() / GIB
        if not tests and avail >= min_gib:
            print(f"machine free: {avail:.1f} GiB available, no pytest running", flush=True)
            return
        if time.monotonic() > deadline:
            print(
                f"waited {timeout_s:.0f} s; going ahead ({avail:.1f} GiB available, pytest pids {tests})",
                flush=True,
            )
            return
        print(f"waiting: {avail:.1f} GiB available (need {min_gib}), pytest pids {tests}", flush=True)
        time.sleep(60)


def gib(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def secs(t: float | None) -> str:
    return "—" if t is None else f"{t:.1f} s"
