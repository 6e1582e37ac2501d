"""`qwen3-mlx chat` in a real pseudo-terminal (pexpect): typing, streaming, Ctrl-C, Tab, Esc Enter, Ctrl-D.

Timeouts are generous and every step waits for the prompt, so a loaded 2-core machine only slows
the tests down. HOME and the XDG folders point into tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest
from checkpoints import make_checkpoint

PROMPT = "› "
# prompt_toolkit turns bracketed paste on when it starts reading a line: a fresh prompt, as opposed
# to the redraw of the line just typed (which also shows the prompt).
READY = "\x1b[?2004h"
START_TIMEOUT = 120  # interpreter start, imports and model load on a busy machine
STEP_TIMEOUT = 60
REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "models" / "qwen3-tiny-chat"
# The live view redraws its lines as "erase line, then text": text after an erase is the reply.
STREAMED_TEXT = r"\x1b\[2K[^\x1b\r\n]"


@pytest.fixture(scope="module")
def babbling_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights with a tiny tied embedding: logits are nearly flat, so sampling draws
    near-uniform tokens that neither loop (the repetition guard) nor hit <|im_end|> soon."""
    import mlx.core as mx

    folder = make_checkpoint(tmp_path_factory.mktemp("pty") / "babble", tokenizer="qwen3-4b")
    path = folder / "model.safetensors"
    weights = dict(mx.load(str(path)))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 0.01
    mx.save_safetensors(str(path), weights)
    return folder


def default_sigint() -> None:
    """Give the child the default Ctrl-C: a shell running the suite in the background (nohup, &)
    passes SIGINT down as ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_cli(
    tmp_path: Path,
    command: str,
    *args: str,
    log_name: str,
    timeout: float = STEP_TIMEOUT,
    launcher: tuple[str, ...] = ("-m", "qwen3_mlx"),
) -> pexpect.spawn:
    """`qwen3-mlx COMMAND ARGS` in a pty, with HOME and the XDG folders in tmp_path (launcher:
    what python runs instead of the package, e.g. tests/scripted_cli.py)."""
    env = dict(os.environ)
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
        TERM="xterm-256color",
        # prompt_toolkit asks the terminal for the cursor position; pexpect never answers.
        PROMPT_TOOLKIT_NO_CPR="1",
    )
    env.pop("QWEN3_MLX_MODEL", None)
    child = pexpect.spawn(
        sys.executable,
        [*launcher, command, *args],
        env=env,
        cwd=str(tmp_path),
        encoding="utf-8",
        dimensions=(40, 120),
        timeout=timeout,
        preexec_fn=default_sigint,
    )
    child.logfile_read = open(tmp_path / log_name, "a", encoding="utf-8")  # noqa: SIM115 (closed with the child)
    return child


def spawn_chat(tmp_path: Path, *args: str, log_name: str = "pty.log") -> pexpect.spawn:
    """The chat REPL in a pty, once it shows its first prompt."""
    child = spawn_cli(tmp_path, "chat", *args, log_name=log_name)
    wait_for_prompt(child, timeout=START_TIMEOUT)
    return child


def wait_for_prompt(child: pexpect.spawn, timeout: float = STEP_TIMEOUT) -> str:
    """Wait for a fresh input prompt; return what was printed before it."""
    child.expect_exact(READY, timeout=timeout)
    before = child.before
    child.expect_exact(PROMPT, timeout=timeout)
    return before


def ask(child: pexpect.spawn, text: str) -> str:
    """Send a line and return everything printed until the next prompt (the reply, its stats)."""
    child.sendline(text)
    return wait_for_prompt(child)


def command(child: pexpect.spawn, text: str) -> str:
    """Send a slash command and return what it printed before the next prompt."""
    child.sendline(text)
    return wait_for_prompt(child)


def quit_with_ctrl_d(child: pexpect.spawn) -> int:
    child.sendcontrol("d")
    child.expect(pexpect.EOF, timeout=STEP_TIMEOUT)
    child.close()
    return child.exitstatus


BABBLE_FLAGS = ("--no-think", "--temp", "1", "--top-p", "1", "--top-k", "0", "--seed", "1")


def test_ctrl_c_editing_keys_save_and_ctrl_d(tmp_path: Path, babbling_model: Path) -> None:
    # One session (each start costs seconds of imports): interrupt a reply, then the editing keys.
    child = spawn_chat(tmp_path, "-m", str(babbling_model), *BABBLE_FLAGS, "--max-tokens", "100000")
    child.sendline("Tell me a long story.")
    child.expect(STREAMED_TEXT)  # the reply is streaming: interrupt it now
    child.sendintr()
    out = wait_for_prompt(child)
    assert "interrupted" in out and "tok/s" in out
    assert child.isalive()
    command(child, "/set max_tokens 3")
    out = ask(child, "And now a short one?")
    assert "3 tokens" in out and "stopped at max_tokens" in out
    # Tab completes a unique command prefix.
    child.send("/sett")
    child.send("\t")
    child.expect_exact("ings")  # the completion is drawn after what was typed
    out = ask(child, "")
    assert "thinking off · temp 1" in out and "Unknown command" not in out
    # Esc Enter (what Alt+Enter sends) inserts a newline instead of sending.
    child.send("first line")
    child.send("\x1b\r")
    child.send("second line")
    assert "tok/s" in ask(child, "")
    # A bracketed paste of several lines stays one message.
    child.send("\x1b[200~pasted one\npasted two\x1b[201~")
    assert "tok/s" in ask(child, "")
    # Ctrl-C on an empty line only explains how to leave.
    child.sendintr()
    assert "Ctrl-D or /exit quits" in wait_for_prompt(child)
    # Ctrl-C on a typed line clears it: the line is never sent.
    child.send("never sent")
    child.sendintr()
    # An unknown command is not sent.
    assert "Unknown command /nope" in command(child, "/nope")
    saved = tmp_path / "chat.json"
    assert "saved" in command(child, f"/save {saved}")
    data = json.loads(saved.read_text())
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == [
        "Tell me a long story.",
        "And now a short one?",
        "first line\nsecond line",
        "pasted one\npasted two",
    ]
    assert [turn["finish_reason"] for turn in data["turns"]] == ["interrupted"] + ["length"] * 3
    assert saved.with_suffix(".md").is_file()
    assert quit_with_ctrl_d(child) == 0
    history = (tmp_path / "data" / "qwen3-mlx" / "history").read_text()
    assert "first line" in history and "/settings" in history


def test_prompt_ctrl_c_exits_130_with_the_partial_answer(
    tmp_path: Path, babbling_model: Path
) -> None:
    env = dict(
        os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), HF_HUB_OFFLINE="1"
    )
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "qwen3_mlx",
            "prompt",
            "Tell me a long story.",
            "-m",
            str(babbling_model),
            "--no-think",
            "--temp",
            "1",
            "--top-p",
            "1",
            "--top-k",
            "0",
            "--max-tokens",
            "100000",
            "--seed",
            "2",
        ],
        env=env,
        encoding="utf-8",
        dimensions=(40, 120),
        timeout=START_TIMEOUT,
        preexec_fn=default_sigint,
    )
    child.logfile_read = open(tmp_path / "prompt.log", "w", encoding="utf-8")  # noqa: SIM115
    child.expect_exact("\x1b[1A\x1b[2K")  # the loading spinner is erased: the model is loaded
    child.expect(r"[^\s\x1b]")  # answer text is streaming
    child.sendintr()
    child.expect("interrupted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


def test_chat_with_the_trained_model(tmp_path: Path) -> None:
    child = spawn_chat(tmp_path, "-m", str(TRAINED), "--seed", "0", "--max-tokens", "200")
    # A question in thinking mode: the reasoning streams, then folds to one line.
    first = ask(child, "Sort these words alphabetically: star apple moon")
    assert "thought for" in first and "tok/s" in first
    # The hard switch: no think block at all.
    assert "thinking off" in command(child, "/no_think")
    second = ask(child, "Reverse these words: lake bird")
    assert "thought for" not in second and "tok/s" in second
    # A soft switch inside a message is sent as written; the model skips its reasoning.
    command(child, "/think")
    third = ask(child, "Sort these words alphabetically: tree apple /no_think")
    assert "tok/s" in third
    saved = tmp_path / "session.json"
    assert "saved" in command(child, f"/save {saved}")
    data = json.loads(saved.read_text())
    users = [m["content"] for m in data["messages"] if m["role"] == "user"]
    answers = [m["content"] for m in data["messages"] if m["role"] == "assistant"]
    assert users == [
        "Sort these words alphabetically: star apple moon",
        "Reverse these words: lake bird",
        "Sort these words alphabetically: tree apple /no_think",
    ]
    # The history holds answers only; the reasoning is kept apart, per turn.
    assert data["turns"][0]["thinking"] and data["turns"][0]["thinking"] not in answers[0]
    assert all("<think>" not in answer and "</think>" not in answer for answer in answers)
    assert data["turns"][1]["thinking"] == "" and data["turns"][2]["thinking"] == ""
    # Each answer was streamed to the screen.
    for reply, answer in zip((first, second, third), answers, strict=True):
        assert answer.strip() and answer.split()[0] in reply
    # /load continues the saved conversation after a /reset.
    assert "conversation cleared" in command(child, "/reset")
    assert "3 exchanges" in command(child, f"/load {saved}")
    assert "tokens used" in command(child, "/context")
    assert "tok/s" in ask(child, "Copy: lake bird")
    assert quit_with_ctrl_d(child) == 0


def test_no_input_ends_the_chat_or_loses_it(tmp_path: Path) -> None:
    # The history file cannot be used (a folder stands where it should be: even root cannot
    # write it), and every line below once ended the chat with exit 1 or a traceback.
    (tmp_path / "data" / "qwen3-mlx" / "history").mkdir(parents=True)
    child = spawn_chat(tmp_path, "-m", str(TRAINED), "--seed", "0", "--max-tokens", "60")
    first = ask(child, "Reverse these words: lake bird /no_think")
    assert "tok/s" in first
    out = command(child, "/save ~nosuchuser/x.json")
    assert "Error: ~nosuchuser/x.json: cannot expand ~nosuchuser" in out
    out = command(child, "/load ~typo")
    assert "Error: ~typo: cannot expand ~typo" in out
    # A line that is not UTF-8 (Latin-1 é) is repaired, said so, and sent.
    os.write(child.child_fd, b"Copy this word: caf\xe9 /no_think\r")
    out = wait_for_prompt(child)
    assert "not valid UTF-8" in out and "tok/s" in out
    # A NUL inside a pasted path.
    child.send("\x1b[200~/save a\x00b.json\x1b[201~")
    out = ask(child, "")
    assert "cannot hold a NUL character" in out
    # /save conv.md keeps the JSON transcript apart from its Markdown copy; /load conv.md works.
    out = command(child, f"/save {tmp_path / 'conv.md'}")
    assert "saved" in out and (tmp_path / "conv.json").is_file()
    assert (tmp_path / "conv.md").read_text().startswith("# Chat")
    assert "2 exchanges" in command(child, f"/load {tmp_path / 'conv.md'}")
    # With --with-cache the KV cache goes beside it, and /load restores it.
    out = command(child, f"/save {tmp_path / 'resume.json'} --with-cache")
    assert "KV cache" in out and (tmp_path / "resume.kv.safetensors").is_file()
    assert "restored the KV cache" in command(child, f"/load {tmp_path / 'resume.json'}")
    # The conversation is whole, and the history warning came once, not on every line.
    full = (tmp_path / "pty.log").read_text()
    assert full.count("line history") == 1 and "Traceback" not in full
    assert "Press ENTER" not in full
    assert quit_with_ctrl_d(child) == 0
