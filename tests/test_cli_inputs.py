"""Bad input to `chat` and `prompt` is refused early and in one line: every sampling boundary as a
usage error before any model loads, unusable transcript paths before a reply is generated, stdin
that is huge or not UTF-8, a closed stdin, and a full disk on stdout."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen3_mlx.cli import options
from qwen3_mlx.cli.app import app

REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "models" / "qwen3-tiny-chat"
runner = CliRunner()


class ModelLoaded(Exception):  # noqa: N818 (a signal, not an error)
    """Raised instead of loading a model: the command got past every check."""


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(self: options.SessionSpec) -> None:
        raise ModelLoaded(self.model)

    monkeypatch.setattr(options.SessionSpec, "open_chat", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("QWEN3_MLX_MODEL", raising=False)


def invoke(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, list(args), input=input)


# value -> accepted? for each setting, at and just past each bound, plus NaN, inf and a wrong type.
BOUNDARIES = {
    "--temp": {"0": True, "2": True, "-0.01": False, "2.01": False, "nan": False, "inf": False},
    "--top-p": {"1": True, "0.01": True, "0": False, "1.01": False, "nan": False, "-inf": False},
    "--top-k": {"0": True, "1000": True, "-1": False, "1.5": False, "many": False},
    "--min-p": {"0": True, "1": True, "-0.1": False, "1.1": False, "nan": False},
    "--presence-penalty": {"-2": True, "2": True, "-2.5": False, "2.01": False, "nan": False},
    "--max-tokens": {"1": True, "81920": True, "0": False, "-5": False, "2.5": False},
    "--seed": {"0": True, "random": True, str(2**63 - 1): True, "-1": False, str(2**63): False},
    "--rope-factor": {"1.5": True, "1": False, "0.5": False, "nan": False, "inf": False},
    "--kv-bits": {"8": True, "4": True, "3": False, "16": False},
}
CASES = [(flag, value, ok) for flag, values in BOUNDARIES.items() for value, ok in values.items()]


@pytest.mark.parametrize("command", ["prompt", "chat"])
@pytest.mark.parametrize("flag,value,accepted", CASES)
def test_every_boundary_is_checked_before_any_model_loads(
    command: str, flag: str, value: str, accepted: bool
) -> None:
    extra = ["--rope-scaling", "yarn"] if flag == "--rope-factor" else []
    args = [command, *(["hi"] if command == "prompt" else []), "-m", "some/model", *extra]
    result = invoke(*args, flag, value)
    if accepted:
        assert "ModelLoaded: some/model" in result.stderr, result.output
    else:
        assert result.exit_code == 2, result.output
        assert "ModelLoaded" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and flag.split("-")[-1] in result.stderr


def test_transcript_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path: Path,
) -> None:
    cases = {
        str(tmp_path / "missing" / "notes.json"): "no folder",
        "~nosuchuser/notes.json": "cannot expand ~nosuchuser",
    }
    readonly = tmp_path / "readonly.json"
    readonly.write_text("{}")
    readonly.chmod(0o444)
    cases[str(readonly)] = "read-only"
    for path, fragment in cases.items():
        result = invoke("prompt", "hi", "-m", "some/model", "--transcript", path)
        assert result.exit_code == 1 and fragment in result.stderr, (path, result.output)
        assert "ModelLoaded" not in result.stderr
    assert stat.S_IMODE(readonly.stat().st_mode) == 0o444 and readonly.read_text() == "{}"
    folder = invoke("prompt", "hi", "-m", "some/model", "--transcript", str(tmp_path))
    assert folder.exit_code == 2 and "is a directory" in folder.stderr


def test_stdin_over_the_largest_context_is_refused_after_a_bounded_read() -> None:
    from qwen3_mlx.cli.prompt_cmd import MAX_MESSAGE_BYTES

    result = invoke("prompt", "-m", "some/model", input=b"word " * (MAX_MESSAGE_BYTES // 5 + 2))
    assert result.exit_code == 2 and "more than any context holds" in result.stderr
    assert "ModelLoaded" not in result.stderr


def test_a_latin1_message_is_repaired_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from qwen3_mlx.cli.prompt_cmd import read_message

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café crème".encode("latin-1"))))
    assert read_message(None) == "caf\ufffd cr\ufffdme"
    assert "not valid UTF-8" in capsys.readouterr().err
    # TEXT given on the command line arrives with surrogate escapes for the bad bytes.
    assert read_message("caf\udce9") == "caf\ufffd"
    assert "not valid UTF-8" in capsys.readouterr().err
    # Real U+FFFD characters in valid UTF-8 are no reason for a warning.
    assert read_message("� ok") == "� ok" and capsys.readouterr().err == ""


def test_chat_with_stdin_closed_is_a_usage_error() -> None:
    result = subprocess.run(
        f"exec {sys.executable} -m qwen3_mlx chat -m {TRAINED} <&-",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for stdin: it is closed; chat reads from a terminal or a pipe"
    )


def test_an_answer_to_a_full_disk_is_one_line_and_exit_1() -> None:
    command = [sys.executable, "-m", "qwen3_mlx", "prompt", "-m", str(TRAINED), "--no-think"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*command, "Copy this word: moon"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: cannot write to stdout") and "No space left" in lines[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the point
def test_ctrl_c_lost_in_a_finalizer_during_start_up_still_exits_130(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 27 (CLI audit): a real SIGINT that lands in a finalizer while the model loads is
    printed by Python as ignored; prompt used to go on and exit 0."""
    import signal
    import threading

    class Finalized:
        def __del__(self) -> None:
            # To this thread: os.kill lets the kernel pick any thread, and on a busy host the
            # handler could then run after this loop, outside the finalizer (seen once in CI).
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode check, still in here
                pass

    class NeverAnswers:
        def send(self, text: str) -> None:
            raise ModelLoaded(text)

    def open_chat(spec: options.SessionSpec) -> NeverAnswers:
        Finalized()  # collected at once: the interrupt is raised inside __del__ and swallowed
        return NeverAnswers()

    monkeypatch.setattr(options.SessionSpec, "open_chat", open_chat)
    result = invoke("prompt", "hi", "-m", "some/model")
    assert result.exit_code == 130, result.output
