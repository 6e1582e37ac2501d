"""Where the output goes: checked up front, written under a hidden name, then renamed into place.

A reader never sees a half-written model: OUTPUT either does not exist, is the old folder, or is
the complete new one. Any failure (an error, Ctrl-C, SIGTERM or SIGHUP turned into an exception by
the CLI, a full disk) removes the hidden folder. Its name carries our process id, so a later run
removes one left by a process that was killed outright (SIGKILL, power loss) but never one that a
running conversion is still writing.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen3_mlx.quantize.errors import ConversionError
from qwen3_mlx.quantize.folder import readable

_FORCE_RULE = (
    "--force replaces only a model folder (config.json and *.safetensors) or an empty folder, "
    "so nothing was deleted"
)


def check_destination(output: Path, source_dir: Path, force: bool) -> None:
    """Refuse a non-UTF-8 OUTPUT, an existing one without force (or one force may not replace),
    and one that is, or holds, the source."""
    if readable(output) != str(output):
        raise ConversionError(
            f"{readable(output)}: the path is not valid UTF-8 and MLX cannot open files under it; "
            "choose another OUTPUT"
        )
    out, src = output.resolve(), source_dir.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise ConversionError(
            f"{output}: the output must not be the source folder, inside it, or hold it"
        )
    if (output.exists() or output.is_symlink()) and not force:
        raise ConversionError(f"{output}: already exists (use --force to replace it)")
    check_replaceable(output)


def check_replaceable(output: Path) -> None:
    """Refuse, by name, anything at OUTPUT that is not an empty folder or a model folder."""
    if not (output.exists() or output.is_symlink()):
        return
    reason = _not_replaceable(output)
    if reason is not None:
        raise ConversionError(f"{output}: {reason}; {_FORCE_RULE}")


def _not_replaceable(output: Path) -> str | None:
    """Why --force must not delete what is at output, or None when it may."""
    if output.is_symlink():
        return "is a symbolic link"
    if not output.is_dir():
        return "is a file, not a folder"
    real = output.resolve()
    if real == _home():
        return "is your home folder"
    cwd = _current_folder()
    if cwd is not None and (real == cwd or real in cwd.parents):
        return "is the current folder or holds it"
    try:
        entries = sorted(os.scandir(output), key=lambda entry: entry.name)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    folders = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    if folders:
        return f"holds the folder {folders[0]!r}"
    names = {entry.name for entry in entries}
    if names and not ("config.json" in names and any(n.endswith(".safetensors") for n in names)):
        return f"holds {sorted(names)[0]!r} and is not a model folder"
    return None


def _current_folder() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing can be inside it
        return None


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry
        return None


def _partial_pattern(output: Path) -> re.Pattern[str]:
    """Our hidden staging names for output: .NAME.partial-PID-HEX."""
    return re.compile(rf"\.{re.escape(output.name)}\.partial-(\d{{1,10}})-[0-9a-f]{{8}}")


def remove_stale_partials(output: Path) -> list[Path]:
    """Remove hidden staging folders for output whose process is gone; return what was removed."""
    pattern, removed = _partial_pattern(output), []
    try:
        entries = list(os.scandir(output.parent))
    except OSError:
        return removed  # the parent does not exist yet: nothing stale in it
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _process_alive(int(match.group(1))):
            continue  # a conversion still running (or a reused pid): never touch it
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number we cannot ask about: leave it
    return True


@contextmanager
def staging_folder(output: Path, force: bool) -> Iterator[Path]:
    """A hidden folder beside OUTPUT; renamed to OUTPUT when the block succeeds, removed if not."""
    remove_stale_partials(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = output.parent / f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as error:
        raise ConversionError(
            f"{output.parent}: cannot create the output ({error.strerror})"
        ) from None
    try:
        yield staging
        replace_folder(staging, output, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, output: Path, force: bool) -> None:
    """Rename staging to output; with force, move the old one aside first and delete it last."""
    try:
        if not (output.exists() or output.is_symlink()):
            os.rename(staging, output)
            return
        if not force:
            raise ConversionError(f"{output}: already exists (use --force to replace it)")
        check_replaceable(output)  # again: it may have changed while we converted
        old = output.parent / f".{output.name}.old-{secrets.token_hex(4)}"
        os.rename(output, old)
        try:
            os.rename(staging, output)
        except BaseException:
            os.rename(old, output)
            raise
    except OSError as error:
        raise ConversionError(
            f"{output}: cannot move the new model into place ({error.strerror})"
        ) from None
    _discard(old)


def _discard(old: Path) -> None:
    """Delete the folder --force replaced (a real folder: check_replaceable refused the rest).

    The new model is in place by now, so the conversion is done: an interrupt here (Ctrl-C, a
    stop signal) finishes the deletion and is not passed on, so nobody reads "not written" and
    no `.old-*` copy is left behind.
    """
    try:
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # noqa: BLE001 (the work is done; only the cleanup remains)
        shutil.rmtree(old, ignore_errors=True)
