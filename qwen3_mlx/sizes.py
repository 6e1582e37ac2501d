"""Byte counts as people read them and write them, once for `info`, `serve`, `quantize` and the
converter."""

from __future__ import annotations

import re

# One grammar for every size a user types: a number, then k/m/g/t (decimal, as disks and the Hub
# count) or ki/mi/gi/ti (binary), with or without a trailing b, in any case: 4g, 4GB, 4GiB, 512mb.
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?)b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})


def parse_size(text: str | int) -> int:
    """Bytes of a size like '4GiB', '512MB', '4g' or a plain number; ValueError otherwise."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() == "i":
        raise ValueError(f"{text!r} is not a size like 4GiB, 512MB or 4g")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(count: int | float) -> str:
    """'4.02 GB', '512.00 MB' or '3.1 kB': decimal units, as disks and the Hub count."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count / 1e3:.1f} kB"
