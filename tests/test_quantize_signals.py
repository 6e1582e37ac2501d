"""`quantize` under real signals: SIGTERM and SIGHUP clean up and exit 143 and 129; a folder left by
SIGKILL is removed by the next run, while a running conversion's folder is never touched (issue 12).

The CLI runs in a subprocess (`python -m qwen3_mlx quantize ...`). A sitecustomize.py on its
PYTHONPATH makes the conversion stop after its first chunk and write a marker file: the test waits
for the marker, so the signal lands mid-conversion every time, without sleeping in the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_quantize import leftovers

from qwen3_mlx.quantize import quantize_checkpoint
from qwen3_mlx.quantize.staging import remove_stale_partials

MakeCheckpoint = Callable[..., Path]
REPO = Path(__file__).resolve().parent.parent

# Runs in the child only. The pause is bounded so a lost signal ends the child instead of the suite.
PAUSE_HOOK = """
import os, time
import qwen3_mlx.quantize.convert as convert

_real_convert_rows = convert.convert_rows

def convert_rows(*args):
    outputs = _real_convert_rows(*args)
    open(os.environ["QUANTIZE_TEST_MARKER"], "w").close()
    for _ in range(1200):
        time.sleep(0.05)  # the signal arrives here, between two tensors
    return outputs

convert.convert_rows = convert_rows
"""


def start_paused_quantize(source: Path, output: Path, hook_dir: Path) -> subprocess.Popen[str]:
    """Start the real CLI on source and return once it is paused inside the conversion."""
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK)
    marker = hook_dir / "converting"
    env = {**os.environ, "PYTHONPATH": str(hook_dir), "QUANTIZE_TEST_MARKER": str(marker)}
    child = subprocess.Popen(
        [sys.executable, "-m", "qwen3_mlx", "quantize", str(source), str(output)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120  # a safety net for a stuck child, not a timing assertion
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            _, stderr = child.communicate()
            pytest.fail(f"the child never reached the conversion: {stderr}")
        time.sleep(0.02)
    return child


def partials(parent: Path, output: Path) -> list[str]:
    return [name for name in leftovers(parent) if name.startswith(f".{output.name}.partial-")]


@pytest.mark.parametrize(
    "signum,exit_code",
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
    ids=["SIGTERM", "SIGHUP"],
)
def test_a_signal_mid_conversion_cleans_up(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, signum: signal.Signals, exit_code: int
) -> None:
    source = make_checkpoint("src", shards=2)
    models = tmp_path / "models"
    output = models / "out"
    child = start_paused_quantize(source, output, tmp_path / "hook")
    assert len(partials(models, output)) == 1  # the hidden folder is there while converting
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == exit_code, stderr
    assert stderr.splitlines()[-1] == f"Error: stopped by {signum.name}; {output} was not written"
    assert stdout == ""
    assert list(models.iterdir()) == []


def test_a_folder_left_by_sigkill_is_removed_by_the_next_run(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    models = tmp_path / "models"
    output = models / "out"
    child = start_paused_quantize(source, output, tmp_path / "hook")
    child.kill()  # SIGKILL: no handler runs, the hidden folder stays
    child.communicate(timeout=120)
    assert len(partials(models, output)) == 1
    quantize_checkpoint(source, output)
    assert leftovers(models) == [] and (output / "model.safetensors").is_file()


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_our_stale_partial_folders_are_removed(tmp_path: Path) -> None:
    output = tmp_path / "out"
    stale = tmp_path / f".out.partial-{dead_pid()}-0123abcd"
    running = tmp_path / f".out.partial-{os.getpid()}-0123abcd"  # a live process: ours, running
    other_output = tmp_path / f".other.partial-{dead_pid()}-0123abcd"
    not_our_pattern = [tmp_path / ".out.partial-notes", tmp_path / ".out.partial-1-xyz"]
    for folder in (stale, running, other_output, *not_our_pattern):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    a_file = tmp_path / f".out.partial-{dead_pid()}-4567cdef"
    a_file.write_text("a file with our name is not a folder of ours")
    assert remove_stale_partials(output) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (running, other_output, *not_our_pattern, a_file)
    )
