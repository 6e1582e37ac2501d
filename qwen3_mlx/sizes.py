"""Byte counts as people read them, written once for `info`, `quantize` and the converter's README."""

from __future__ import annotations


def format_size(count: int | float) -> str:
    """'4.02 GB', '512.00 MB' or '3.1 kB': decimal units, as disks and the Hub count."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count / 1e3:.1f} kB"
