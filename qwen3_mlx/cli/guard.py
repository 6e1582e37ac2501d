"""How commands fail: one `Error: ...` line on stderr and an exit code; tracebacks only with --debug."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from qwen3_mlx.errors import Qwen3Error

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPT = 130


# Typer >= 0.20 vendors Click; older versions re-export click's classes. Either way the usage-error
# base class is an ancestor of typer.BadParameter, and it must reach Typer untouched (exit 2).
_USAGE_BASE = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_PASS_THROUGH = (typer.Exit, typer.Abort, _USAGE_BASE, BrokenPipeError)


def is_debug(ctx: typer.Context | None = None) -> bool:
    """Whether --debug was given to the app (ctx: the command's context; None: not known)."""
    if ctx is None:
        return False
    obj = ctx.find_root().obj
    return bool(isinstance(obj, dict) and obj.get("debug"))


def error_line(message: str) -> None:
    """Print `Error: message` on stderr, as one line."""
    print(f"Error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _show_warning(
    message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    # One quiet line instead of Python's two-line "file:line: Category: message".
    print(f"Warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


@contextmanager
def kept_interrupt() -> Iterator[None]:
    """Ctrl-C in this block always ends it, even one Python reports as ignored.

    A Ctrl-C that lands while a finalizer runs (start-up collects many objects) is printed as a
    bare `KeyboardInterrupt:` and swallowed, and the command would go on to exit 0; here it is
    raised again when the block ends. Only where Ctrl-C has Python's own handler, in the main
    thread.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    seen = []

    def interrupt(number: int, frame: Any) -> None:
        seen.append(number)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if seen:
        raise KeyboardInterrupt


# Closing the terminal sends SIGHUP; kill, systemd and container stops send SIGTERM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _leave(number: int) -> BaseException:
    return SystemExit(128 + number)


@contextmanager
def stop_on_signals(stopped: Callable[[int], BaseException] = _leave) -> Iterator[None]:
    """SIGTERM and SIGHUP end the block as leaving it does: `stopped(signal)` is raised where
    Python was (by default exit 128 + the signal), so every `finally` on the way runs (MCP servers
    and their process trees are stopped, a partial folder removed); a second signal is ignored,
    so it cannot cut that cleanup short.

    A signal that was ignored when we started (nohup) stays ignored. Only the main thread can
    set handlers; elsewhere (a test runner's thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number: int, frame: Any) -> None:
        for each in STOP_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        raise stopped(number)

    previous = {}
    for number in STOP_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def reported_errors(ctx: typer.Context | None = None) -> Iterator[None]:
    """Turn Qwen3Error into exit 1, Ctrl-C into 130, anything unexpected into exit 1 + a hint."""
    debug = is_debug(ctx)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        if not debug:
            # Library deprecation chatter is for developers, not for someone chatting.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
        try:
            yield
        except _PASS_THROUGH:
            raise
        except KeyboardInterrupt:
            print(file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPT) from None
        except Qwen3Error as error:
            if debug:
                traceback.print_exc()
            error_line(str(error))
            raise typer.Exit(EXIT_RUNTIME) from None
        except Exception as error:
            if debug:
                traceback.print_exc()
                error_line(f"{type(error).__name__}: {error}")
            else:
                error_line(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
            raise typer.Exit(EXIT_RUNTIME) from None
