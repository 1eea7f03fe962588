"""A bound on the time between training steps: a rank that finishes no step for `heartbeat_s` ends itself.

A frozen (SIGSTOP) or hung peer holds every other rank in a collective until the process group's
time-out, `collective_timeout_s` (600 s by default: it must also cover the slowest legitimate wait). A
training step is short and regular, so the time since the last finished step is a far tighter bound: a
daemon thread watches it and, past `heartbeat_s`, prints one line and leaves with EXIT_PEER_LOST, which
the SLURM layer requeues (slurm/heal.py). The thread ends the process with `os._exit`: a Python exception
cannot interrupt the main thread while it waits in a gloo/NCCL collective, and the collective releases
the GIL while it waits, so the thread runs. Nothing is flushed or saved on the way out; the requeued job
resumes from the last complete checkpoint.

The trade-off: the bound is armed by the first `beat()`, not before. The first step (DeepSpeed's first
allocations, compilation) and what precedes the loop (a universal-checkpoint conversion, bounded by
`ckpt.convert_timeout_s`) take a time the heartbeat cannot predict, so a peer lost before the first step
still costs `collective_timeout_s`. Likewise checkpoint saves and sample grids run `paused()`:
`collective_timeout_s` bounds the ranks that wait for them. `heartbeat_s` must exceed the longest step.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from trainer.common import EXIT_PEER_LOST

GLOO_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")
"""Fragments of the RuntimeError messages gloo raises in a rank whose peer is gone (see is_peer_loss)."""


class Heartbeat:
    """Ends this process with EXIT_PEER_LOST when armed, not paused, and no beat came for `bound_s` seconds.

    `bound_s` <= 0 turns it off (no thread).
    """

    def __init__(self, bound_s: float, rank: int) -> None:
        self.bound_s, self.rank = bound_s, rank
        self._last: float | None = None  # time.monotonic() of the last beat; None: not armed yet
        self._paused = False
        self._stopped = threading.Event()
        self._thread = None
        if bound_s > 0:
            self._thread = threading.Thread(target=self._watch, name="heartbeat", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        """A training step finished (the first call arms the bound)."""
        self._last = time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The bound does not run inside the block; leaving it counts as a beat."""
        self._paused = True
        try:
            yield
        finally:
            self.beat()  # before unpausing: the watcher must never see an old beat unpaused
            self._paused = False

    def stop(self) -> None:
        if self._thread is not None:
            self._stopped.set()
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.bound_s / 10)):
            if self._paused:  # read before _last: paused() beats before it unpauses
                continue
            last = self._last
            if last is None or (silent := time.monotonic() - last) <= self.bound_s:
                continue
            print(
                f"rank {self.rank}: no training step finished for {silent:.0f} s (heartbeat_s={self.bound_s:g}): "
                f"a peer is lost or hung; exiting with code {EXIT_PEER_LOST} so that the job is requeued",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_PEER_LOST)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc` is what a rank gets when a peer died or hung: requeue, do not blame the input.

    torch.distributed.DistError and its subclasses (DistBackendError, DistNetworkError, DistStoreError),
    and gloo's plain RuntimeErrors. Observed with torch 2.14.1 and gloo, 2 processes on one host, rank 0 in
    an all_reduce loop:
    - rank 1 SIGKILLed: RuntimeError at once, "[.../gloo/transport/tcp/pair.cc:545] Read error
      [127.0.0.1]:52897: Connection reset by peer. This is typically caused by a remote worker hanging or
      bugs in the application. ..." (7 of 8 tries), or "[.../pair.cc:561] Connection closed by peer
      [127.0.0.1]:20884. This is typically caused by a remote worker crashing. ..." (1 of 8);
    - rank 1 SIGSTOPped, process group time-out 5 s: RuntimeError after 5.0 s,
      "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete".
    """
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in GLOO_PEER_LOST)
