"""A 'Loading …' spinner on stderr, shown only when a person is watching a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console


@contextmanager
def loading(model: str, *, interactive: bool | None = None) -> Iterator[None]:
    """Show a spinner while a model loads, if both stdout and stderr are terminals."""
    if interactive is None:
        interactive = sys.stdout.isatty() and sys.stderr.isatty()
    status = Console(stderr=True).status(f"Loading {model} …") if interactive else nullcontext()
    with status:
        yield
