"""Commands under `mlx.launch`: rank 0 runs the command with its shard; the other ranks follow.

Rank 0 owns the terminal (or the HTTP socket) and everything a user sees. The other ranks load
their shard, run the forward passes rank 0 announces and exit with rank 0's exit code when it
stops. They leave Ctrl-C, SIGTERM and SIGHUP to rank 0 (on one machine the terminal, systemd or a
container stop sends them to every rank), and every rank watches its launcher
(parallel/group_end.py): without it, rank 0 stops as on SIGTERM. A follower told to stop, or left
by its launcher, waits for rank 0's stop at most QWEN3_MLX_RANK_TIMEOUT seconds.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import typer

from qwen3_mlx.cli.guard import EXIT_RUNTIME, error_line, reported_errors
from qwen3_mlx.errors import DistributedError
from qwen3_mlx.parallel.watchdog import DEFAULT_RANK_TIMEOUT, RANK_TIMEOUT_ENV, rank_timeout

LAST_WORDS_SECONDS = 1.0


def distributed_command(command: Callable[..., None]) -> Callable[..., None]:
    """Make a command that takes `session` run across the ranks of an mlx.launch group."""

    @functools.wraps(command)
    def run(ctx: typer.Context, session: Any, **values: Any) -> None:
        from qwen3_mlx.parallel.distributed import launched

        if not launched():
            command(ctx=ctx, session=session, **values)
            return
        from qwen3_mlx.parallel.distributed import join_group

        with reported_errors(ctx):
            if session.spec().auto_rope:  # checked on every rank, before any of them connects
                raise DistributedError(
                    "--rope-scaling auto does not run under mlx.launch (it would move rank 0's "
                    "RoPE alone); use --rope-scaling yarn"
                )
            group = join_group()
        if group.size() == 1:
            command(ctx=ctx, session=session, **values)
            return
        from qwen3_mlx.parallel.group_end import stop_leader, watch_parent

        if group.rank() == 0:
            watch_parent(stop_leader)
            _lead(command, ctx, session, values)
        else:
            _hold_follower(group.rank())
            with reported_errors(ctx):
                code = _follow(session.spec(), group)
            if code:
                raise typer.Exit(code)

    return run


def _rank_timeout() -> float:
    """QWEN3_MLX_RANK_TIMEOUT, or its default where the setting is wrong (said where it matters)."""
    try:
        return rank_timeout()
    except DistributedError:
        return DEFAULT_RANK_TIMEOUT


def _lead(command: Callable[..., None], ctx: Any, session: Any, values: dict[str, Any]) -> None:
    """Run the command on rank 0; on the way out, stop the followers with its exit code."""
    from qwen3_mlx.parallel.lockstep import stop_followers

    code = EXIT_RUNTIME
    try:
        command(ctx=ctx, session=session, **values)
        code = 0
    except typer.Exit as done:
        code = done.exit_code
        raise
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else EXIT_RUNTIME
        raise
    finally:
        from qwen3_mlx.parallel.watchdog import StallWatchdog

        watchdog = StallWatchdog(_rank_timeout(), end_for_lost_rank)
        try:
            with watchdog.watching("stopping them"):
                stop_followers(code)
        except RuntimeError:
            pass  # a follower already went away: nothing is left to stop


def end_for_lost_rank(error: Exception) -> None:
    """End rank 0 at once with the one-line error: a rank stopped answering, and the thread that
    waits for it cannot be interrupted (called from a watchdog thread)."""
    time.sleep(LAST_WORDS_SECONDS)  # the failed requests' errors reach their clients
    error_line(str(error))
    os._exit(EXIT_RUNTIME)


def _hold_follower(rank: int) -> None:
    """Leave the stop signals to rank 0, and bound the wait for its stop once this rank is told
    to stop or its launcher is gone."""
    import signal

    from qwen3_mlx.parallel.group_end import FollowerDeadline, hold_stop_signals, watch_parent

    seconds = _rank_timeout()
    deadline = FollowerDeadline(seconds, functools.partial(end_follower, rank, seconds))
    watch_parent(lambda: deadline.begin("its launcher (mlx.launch) ended"))
    hold_stop_signals(lambda number: deadline.begin(f"it got {signal.Signals(number).name}"))


def end_follower(rank: int, seconds: float, reason: str) -> None:
    """End a follower whose wait for rank 0's stop ran out (from a timer thread: its main thread
    is in a collective that cannot be interrupted)."""
    try:  # stderr was the launcher's pipe: it may be closed now
        error_line(
            f"rank {rank}: {reason}, and rank 0 sent no stop within {seconds:g} s "
            f"({RANK_TIMEOUT_ENV})"
        )
    finally:
        os._exit(EXIT_RUNTIME)


def _follow(spec: Any, group: Any) -> int:
    """Load this rank's shard and run rank 0's forward passes until it stops; its exit code."""
    from qwen3_mlx.parallel.distributed import load_group_model
    from qwen3_mlx.parallel.lockstep import follow, ignore_interrupts, lost_connection
    from qwen3_mlx.parallel.watchdog import is_lost_connection

    ignore_interrupts()
    try:
        model, _, _ = load_group_model(
            spec.model, group, rope_scaling=spec.rope_scaling, compute_dtype=spec.compute_dtype
        )
        return follow(model, group)
    except RuntimeError as error:
        if is_lost_connection(error):
            raise lost_connection(error) from None
        raise
