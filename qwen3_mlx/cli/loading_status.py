"""A 'Loading …' spinner on stderr, shown only when a person is watching a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console

from qwen3_mlx.cli.guard import kept_interrupt


@contextmanager
def loading(model: str, *, interactive: bool | None = None) -> Iterator[None]:
    """Show a spinner while a model loads, if both stdout and stderr are terminals; Ctrl-C
    meanwhile always ends the command (kept_interrupt)."""
    if interactive is None:
        interactive = sys.stdout.isatty() and sys.stderr.isatty()
    status = Console(stderr=True).status(f"Loading {model} …") if interactive else nullcontext()
    with kept_interrupt(), status:
        yield
