"""A rank never outlives its launcher.

mlx.launch starts each local rank as its child and, on SIGTERM, ends at once without passing the
signal on (mlx 0.32): `kill <launcher>` left both ranks running, rank 0 still serving its port,
with nothing left to stop them. So every rank of a group watches its parent. When the parent is
gone, rank 0 stops as SIGTERM stops it (a server drains its replies, then every command stops the
followers with its exit code). A follower waits for that stop at most the bound rank 0 uses for
the other ranks (QWEN3_MLX_RANK_TIMEOUT): if rank 0 is gone too, the follower's collective can
wait forever and cannot be interrupted, so the watching thread ends the process (the CLI's
`distributed_run` says how).

Polling getppid() is portable (macOS has no parent-death signal) and costs one system call a
half second.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

PARENT_PERIOD = 0.5


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
    """Rank 0 left by its launcher: stop as a SIGTERM stops it (handled on the main thread)."""
    os.kill(os.getpid(), signal.SIGTERM)
