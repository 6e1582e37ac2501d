"""Long conversations from the command line: `--rope-scaling auto`, `chat --load FILE`, and the
progress line of a long prefill under `prompt` (on a terminal only)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qwen3_mlx.cli.render import PROGRESS_FROM_TOKENS, PrefillProgress
from tests.checkpoints import make_checkpoint
from tests.test_cli import invoke, isolated_env, tokenizers_loaded_once  # noqa: F401 (fixtures)

WINDOW = 256


@pytest.fixture(scope="module")
def short_window(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model trained (as far as its config says) on 256 tokens."""
    return make_checkpoint(
        tmp_path_factory.mktemp("long") / "m",
        tokenizer="qwen3-4b",
        max_position_embeddings=WINDOW,
    )


def test_prompt_with_auto_rope_switches_once_and_says_so(short_window: Path) -> None:
    long_message = " ".join(["word"] * 300)
    base = ["-m", str(short_window), "--no-think", "--max-tokens", "4", "--json"]
    auto = invoke("prompt", long_message, *base, "--rope-scaling", "auto")
    assert auto.exit_code == 0, auto.stderr
    notes = [line for line in auto.stderr.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1 and "YaRN factor 2 (512 tokens)" in notes[0], auto.stderr
    # Without auto the same message does not fit: a clear error that names the way out.
    native = invoke("prompt", long_message, *base)
    assert native.exit_code == 1 and "--rope-scaling" in native.stderr
    short = invoke("prompt", "hello", *base, "--rope-scaling", "auto")
    assert short.exit_code == 0 and "Note:" not in short.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prompt", "hi", "--rope-scaling", "auto", "--rope-factor", "2"], "--rope-scaling yarn"),
        (["serve", "--rope-scaling", "auto"], "auto is for chat and prompt"),
        (["serve", "--api-key", ""], "an empty key"),  # (would turn authentication off)
        (["chat", "--load", "missing.json"], "missing.json"),
    ],
)
def test_long_context_usage_errors(short_window: Path, args: list[str], message: str) -> None:
    result = invoke(*args, "-m", str(short_window))
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr


def test_chat_load_continues_a_saved_conversation(short_window: Path, tmp_path: Path) -> None:
    saved = tmp_path / "conv.json"
    first = invoke(
        "prompt", "first question", "-m", str(short_window), "--max-tokens", "3",
        "--transcript", str(saved),
    )  # fmt: skip
    assert first.exit_code == 0, first.stderr
    result = invoke("chat", "-m", str(short_window), "--load", str(saved), input="/context\n")
    assert result.exit_code == 0, result.stderr
    shown = " ".join(result.stdout.split())  # rich wraps long lines
    assert f"loaded {saved}: 1 exchange" in shown and "of 256 tokens used" in shown
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    broken = invoke("chat", "-m", str(short_window), "--load", str(damaged), input="")
    assert broken.exit_code == 1 and broken.stderr.startswith("Error: "), broken.stderr
    assert json.loads(saved.read_text())["messages"][0]["content"] == "first question"


class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_prefill_progress_shows_only_on_a_terminal_and_is_erased_at_the_end() -> None:
    total = 4 * PROGRESS_FROM_TOKENS
    for tty in (True, False):
        stream = FakeTerminal(tty)
        progress = PrefillProgress(stream)
        for done in range(0, total + 1, 512):
            progress(done, total)
        text = stream.getvalue()
        if not tty:
            assert text == ""
            continue
        assert f"reading the prompt: 512 of {total:,} tokens" in text
        assert f"{total - 512:,} of {total:,}" in text and "s left" in text
        assert text.endswith("\r\x1b[2K")  # erased once the prompt is read
    short = FakeTerminal(True)
    PrefillProgress(short)(512, PROGRESS_FROM_TOKENS - 1)
    assert short.getvalue() == ""
