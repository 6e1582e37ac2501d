"""How the ranks of a group end together.

Rank 0 decides when a group stops: on the way out it tells the followers to exit with its exit
code, after a server has let its replies in flight end. Two things went around that:

- **The launcher ended alone.** mlx.launch (mlx 0.32) exits at SIGTERM without passing it on, so
  `kill <launcher>` left both ranks of `serve` running, rank 0 still holding its port. Every rank
  now watches its parent: without it, rank 0 stops as on SIGTERM.
- **A stop signal reached every rank at once** (systemd or a container stopping the group,
  `kill -TERM -<group>`, a closed terminal's SIGHUP). A follower died of it at once, so rank 0's
  reply in flight stalled in a collective: it failed at the drain bound, and rank 0 hung until its
  watchdog. A follower now leaves SIGTERM and SIGHUP to rank 0, as it leaves Ctrl-C.

Either way a follower then waits for rank 0's stop at most the bound rank 0 uses for the other
ranks (QWEN3_MLX_RANK_TIMEOUT). If rank 0 is gone, its collective usually fails at once (the ring
sees the closed socket); where it does not, it could wait forever and cannot be interrupted, so a
timer thread ends the process (the CLI's `distributed_run` says how).

Polling getppid() is portable (macOS has no parent-death signal) and costs one system call a
half second. A follower's signals are noticed through `signal.set_wakeup_fd`, because its main
thread, where Python runs signal handlers, is usually inside a collective.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

PARENT_PERIOD = 0.5
# SIGTERM: kill, systemd and container stops; SIGHUP: a closed terminal (as cli/guard.py's).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def watch_parent(on_gone: Callable[[], None], period: float = PARENT_PERIOD) -> threading.Thread:
    """Call `on_gone()` once, from a daemon thread, when this process's parent has ended."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        on_gone()

    thread = threading.Thread(target=watch, name="qwen3-mlx-parent-watch", daemon=True)
    thread.start()
    return thread


def stop_leader() -> None:
    """Rank 0 left by its launcher: stop as a SIGTERM stops it (handled on the main thread; a
    second SIGTERM does not cut a server's drain short)."""
    os.kill(os.getpid(), signal.SIGTERM)


class FollowerDeadline:
    """Ends a follower `seconds` after it was first told to stop, unless rank 0's stop ends the
    process first: `on_overdue(reason)` must end the process."""

    def __init__(self, seconds: float, on_overdue: Callable[[str], None]):
        self.seconds = seconds
        self.on_overdue = on_overdue
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def begin(self, reason: str) -> None:
        """Start the countdown (the first call only)."""
        with self.lock:
            if self.timer is None:
                self.timer = threading.Timer(self.seconds, self.on_overdue, args=(reason,))
                self.timer.daemon = True
                self.timer.start()


def hold_stop_signals(on_signal: Callable[[int], None]) -> None:
    """Leave SIGTERM and SIGHUP to rank 0: they no longer end this process; `on_signal(number)`
    is called from a daemon thread at each. Main thread only; a signal ignored at start (nohup)
    stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    held = [number for number in STOP_SIGNALS if signal.getsignal(number) is not signal.SIG_IGN]
    if not held:
        return
    for number in held:
        signal.signal(number, lambda *args: None)  # (runs once the collective returns)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def read() -> None:
        while True:
            for number in os.read(read_end, 16):
                on_signal(number)

    threading.Thread(target=read, name="qwen3-mlx-stop-signals", daemon=True).start()
