"""A bound on how long rank 0 waits for the other ranks.

A collective whose peer has died can wait forever (MLX's ring backend does not always fail its
pending operations). Rank 0 marks the work that needs the other ranks (a decoding step, stopping
them) as watched; one watched piece of work that runs past the bound means a rank is gone, and the
watchdog calls its `on_stall` once, from its own thread: the caller fails what is in flight,
says so in one line and ends the process, since the stuck thread cannot be interrupted.
(mx.eval releases the GIL while it waits, so this Python thread runs meanwhile.)
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from qwen3_mlx.errors import DistributedError

RANK_TIMEOUT_ENV = "QWEN3_MLX_RANK_TIMEOUT"
DEFAULT_RANK_TIMEOUT = 120.0


def rank_timeout() -> float:
    """Seconds one step may wait for the other ranks (QWEN3_MLX_RANK_TIMEOUT, default 120)."""
    text = os.environ.get(RANK_TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_RANK_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{RANK_TIMEOUT_ENV} must be a positive number of seconds")
    return seconds


def stalled(seconds: float, what: str) -> DistributedError:
    """The one-line error for work that waited past the bound."""
    return DistributedError(
        f"lost the connection to another rank ({what} waited more than {seconds:g} s for the "
        f"other ranks; set {RANK_TIMEOUT_ENV} to wait longer)"
    )


class StallWatchdog:
    """Calls `on_stall(error)` once when a piece of watched work runs longer than `seconds`."""

    def __init__(self, seconds: float, on_stall: Callable[[DistributedError], None]):
        self.seconds = seconds
        self.on_stall = on_stall
        self.watched: dict[int, tuple[float, str]] = {}
        self.numbers = itertools.count()
        self.lock = threading.Lock()
        self.fired = False
        self.thread: threading.Thread | None = None

    @contextmanager
    def watching(self, what: str) -> Iterator[None]:
        """Watch the block (`what` names it in the error)."""
        number = next(self.numbers)
        with self.lock:
            self.watched[number] = (time.monotonic(), what)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="qwen3-mlx-watchdog", daemon=True
                )
                self.thread.start()
        try:
            yield
        finally:
            with self.lock:
                self.watched.pop(number, None)

    def _run(self) -> None:
        period = min(1.0, self.seconds / 10)
        while not self.fired:
            time.sleep(period)
            now = time.monotonic()
            with self.lock:
                late = [what for began, what in self.watched.values() if now - began > self.seconds]
            if late:
                self.fire(stalled(self.seconds, late[0]))

    def fire(self, error: DistributedError) -> None:
        """Call on_stall with `error` now (once: later calls do nothing)."""
        with self.lock:
            if self.fired:
                return
            self.fired = True
        self.on_stall(error)


def is_lost_connection(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (MLX's ring says so)."""
    return isinstance(error, RuntimeError) and (
        "[ring]" in str(error) or "connection" in str(error)
    )
