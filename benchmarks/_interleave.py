"""Interleaved benchmark rounds (issue #19): every contender in a fresh process, the order rotated each
round, medians over rounds, ratios against a baseline measured in the same run.

Why each rule: this machine is shared, so its speed drifts over minutes; contenders that run A, B, A, B …
see the same drift, and the median of rounds drops a round that a neighbour slowed. A fresh process per
contender and round keeps one contender's allocator state (DeepSpeed's allocations inflated a shared
process's step by 20%) and warm caches away from the next. Rotating the order (A B, B A, A B …) keeps
any contender from always running first, after the machine idled.

A contender is a command run from the repository root, as `ranks` processes with torchrun-style variables
(`slurm.env.child_env`, the environment `ldit … --local N` gives its ranks, torch's huge-page allocation
`slurm.env.ALLOCATOR_ENV` included unless the caller's environment sets it) and `OMP_NUM_THREADS` = cores
/ ranks unless given. Each process prints one line `BENCH_RESULT {json}` (:func:`report`): its figures,
e.g. the median step time over its steps after warm-up, and `torch.get_num_threads()`. Rank 0's figures
count; every rank's thread count is kept.

    results = run_rounds([Contender("plain", [...]), Contender("trainer", [...])], rounds=3)
    rows = {name: values(results, name, "step_s") for name in results}
    print(table(rows, baseline="plain"))
    print(ratio("trainer/plain", rows["trainer"], rows["plain"]))

Each run's line gives the machine's 1-minute load average: with another process busy on one of the 2
cores, a 2-thread contender ran 10× slower here (the plain loop at 12x384: 14.7 s a step instead of
1.3 s; 2.7 s with 1 thread), so take final figures on an idle machine.

Imported as `_interleave`: `python benchmarks/bench_x.py` puts benchmarks/ on sys.path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "
"""Prefix of the one line of figures a contender process prints on stdout."""


@dataclass(frozen=True)
class Contender:
    name: str
    argv: Sequence[str]
    """The command of one process, run in the repository root."""
    ranks: int = 1
    """Processes started together (a world of this size); rank 0's figures count."""


def report(figures: dict[str, object], threads: int | None = None) -> None:
    """In a contender process: print its figures and thread count (torch's, unless given) as the result line."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    print(MARK + json.dumps({**figures, "threads": threads}), flush=True)


def median_after(times: Sequence[float], warmup: int) -> float:
    """The median of `times` without the first `warmup` (all of them when fewer are left)."""
    return statistics.median(times[warmup:] or times)


def rotation(names: Sequence[str], round_: int) -> list[str]:
    """The order of round `round_` (0-based): the list rotated left by the round's number."""
    k = round_ % len(names)
    return [*names[k:], *names[:k]]


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _run(c: Contender, threads: int | None, timeout_s: float) -> dict:
    """Run one contender's processes; their figures (rank 0's, with every rank's threads) or {'error': ...}."""
    from slurm.env import child_env, free_port

    port = free_port()
    omp = str(threads or max(1, cores() // c.ranks))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        outs = [Path(tmp) / f"rank{r}.out" for r in range(c.ranks)]
        procs = []
        for r, out in enumerate(outs):
            env = child_env(r, c.ranks, port) | {"OMP_NUM_THREADS": omp, "PYTHONUNBUFFERED": "1"}
            with open(out, "w") as f:
                procs.append(subprocess.Popen(list(c.argv), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        deadline, timed_out = time.monotonic() + timeout_s, False
        while any(p.poll() is None for p in procs):
            timed_out = time.monotonic() > deadline
            if timed_out or any(p.poll() not in (None, 0) for p in procs):  # a lost rank holds the others
                for p in procs:  # each rank with what it started (DataLoader workers)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                break
            time.sleep(0.05)
        texts = [out.read_text(errors="replace") for out in outs]
    lines = [[json.loads(s.removeprefix(MARK)) for s in t.splitlines() if s.startswith(MARK)] for t in texts]
    if not timed_out and all(p.returncode == 0 for p in procs) and all(lines):
        return {**lines[0][-1], "threads": [x[-1]["threads"] for x in lines]}
    bad = [r for r, p in enumerate(procs) if p.returncode not in (0, -9)] or [0]  # -9: killed here
    r = bad[0]
    why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit {procs[r].returncode}"
    tail = [s.strip()[:300] for s in texts[r].splitlines() if s.strip() and not s.startswith(MARK)][-3:]
    return {"error": f"rank {r} {why}: " + " | ".join(tail)}


def run_rounds(
    contenders: Sequence[Contender],
    rounds: int,
    *,
    threads: int | None = None,
    timeout_s: float = 3600.0,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict]]:
    """Run `rounds` rounds, each contender once per round in the rotated order; a contender that fails is
    not run again. Returns name → its per-round figures ({'error': ...} where it failed)."""
    by_name = {c.name: c for c in contenders}
    results: dict[str, list[dict]] = {c.name: [] for c in contenders}
    for i in range(rounds):
        for name in rotation(list(by_name), i):
            if any("error" in r for r in results[name]):
                results[name].append({"error": "failed in an earlier round"})
                continue
            t0 = time.monotonic()
            r = _run(by_name[name], threads, timeout_s)
            results[name].append(r)
            shown = r.get("error") or ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float))
            threads_ = "/".join(map(str, r.get("threads", ["?"])))
            log(f"round {i + 1}/{rounds}  {name}: {shown}  (threads {threads_}, {time.monotonic() - t0:.1f} s, "
                f"load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    return results


def values(results: dict[str, list[dict]], name: str, key: str) -> list[float | None]:
    """Contender `name`'s figure `key` in each round (None where it failed)."""
    return [r.get(key) for r in results[name]]


def median(xs: Sequence[float | None]) -> float | None:
    """The median of the rounds that gave a figure (None if none did)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(
    rows: dict[str, Sequence[float | None]],
    *,
    baseline: str | None = None,
    scale: float = 1.0,
    unit: str = "",
) -> str:
    """One row per series: its per-round values, their median and the median's ratio to `baseline`'s."""
    n = max((len(v) for v in rows.values()), default=0)
    width = max([len(k) for k in rows] + [8])
    base = median(rows[baseline]) if baseline else None
    head = [f"round {i + 1}" for i in range(n)] + ["median", f"/ {baseline}" if baseline else ""]
    out = [f"{unit:<{width}}  " + "  ".join(f"{h:>10}" for h in head).rstrip()]
    for k, v in rows.items():
        cells = [_num(x, scale) for x in v] + [""] * (n - len(v)) + [_num(median(v), scale)]
        if baseline:
            m = median(v)
            cells.append(_num(m / base, 1.0, 3) if m is not None and base else "—")
        out.append(f"{k:<{width}}  " + "  ".join(f"{c:>10}" for c in cells))
    return "\n".join(out)


def ratio(label: str, num: Sequence[float | None], den: Sequence[float | None]) -> str:
    """`label: R` with R the ratio of the medians, and the ratio of each round for the spread."""
    a, b = median(num), median(den)
    per = ["—" if x is None or y is None or not y else f"{x / y:.3f}" for x, y in zip(num, den)]
    r = f"{a / b:.3f}" if a is not None and b else "—"
    return f"ratio {label}: {r}  (ratio of medians; per round {' '.join(per)})"


def threads_line(results: dict[str, list[dict]]) -> str:
    """`torch threads: name N, …`, each contender process's torch.get_num_threads() (one per rank)."""

    def of(rs: list[dict]) -> str:
        seen = sorted({"/".join(map(str, r["threads"])) for r in rs if "threads" in r})
        return " or ".join(seen) or "?"

    return "torch threads: " + ", ".join(f"{k} {of(v)}" for k, v in results.items())


def errors(results: dict[str, list[dict]]) -> list[str]:
    """One line per contender that failed, with its first error."""
    return [
        f"{k} failed: {e}"
        for k, rs in results.items()
        if (e := next((r["error"] for r in rs if "error" in r), None))
    ]


def _num(x: float | None, scale: float, digits: int | None = None) -> str:
    if x is None:
        return "failed"
    x *= scale
    if digits is None:
        digits = 1 if abs(x) >= 100 else 3 if abs(x) < 10 else 2
    return f"{x:,.{digits}f}"


def python(script: str, *args: str) -> list[str]:
    """The command that runs benchmarks/`script` with this interpreter."""
    return [sys.executable, str(ROOT / "benchmarks" / script), *args]
