"""One log file per MCP server, holding its stderr, kept to a bounded size.

The server writes to the file directly (it is its stderr), so the file is bounded the way
logrotate's copytruncate does it: past LOG_CAP bytes its newest LOG_CAP bytes are copied to `NAME.log.1`
(replacing the older copy) and it is emptied; the server's appends go on at the new end. It is checked when opened and
every CHECK_SECONDS while the server runs: a noisy server costs the cap twice, plus what it writes in CHECK_SECONDS.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import IO

LOG_CAP = 5 * 2**20
CHECK_SECONDS = 1.0


def open_log(path: Path, starting: str) -> IO[str]:
    """The log opened for appending, with a first line saying what starts."""
    log = path.open("a", encoding="utf-8", errors="replace")
    rotate_if_big(path, log)
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {starting}\n")
    log.flush()
    return log


def rotate_if_big(path: Path, log: IO[str]) -> None:
    """Past LOG_CAP bytes: keep its end in NAME.log.1 and empty it, saying so in its first line."""
    log.flush()
    if os.fstat(log.fileno()).st_size <= LOG_CAP:
        return
    older = path.with_name(path.name + ".1")
    with path.open("rb") as source, older.open("wb") as copy:
        source.seek(-LOG_CAP, os.SEEK_END)  # the newest part only: a burst is bounded too
        shutil.copyfileobj(source, copy)
    os.ftruncate(log.fileno(), 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(
        f"--- {stamp} the log passed {LOG_CAP // 2**20} MiB: what came before is in {older}\n"
    )
    log.flush()


async def keep_bounded(path: Path, log: IO[str]) -> None:
    """Check the log's size every CHECK_SECONDS until cancelled."""
    while True:
        await asyncio.sleep(CHECK_SECONDS)
        try:
            rotate_if_big(path, log)
        except (OSError, ValueError):
            return  # the file went away or was closed: nothing left to bound


def last_line(path: Path, offset: int) -> str:
    """The last non-empty line written from offset on (from the start if the log was emptied)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as log:
            log.seek(offset if offset <= path.stat().st_size else 0)
            lines = [line.strip() for line in log if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""
