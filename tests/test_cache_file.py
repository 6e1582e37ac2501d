"""A conversation saved with its KV cache resumes in a new process without a re-prefill: the cache
restored is the one saved, the next reply prefills what an uninterrupted session would, and its
greedy tokens are the same. Another model, compute dtype, KV setting or template, and a damaged
file, fall back to a prefill with a one-line note, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_checkpoint

from qwen3_mlx.cache_file import cache_path
from qwen3_mlx.chat import Chat

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "qwen3-tiny-chat"
QUESTIONS = ["Reverse these words: moon river star", "Sort: tree apple", "Copy: lake bird"]
NEXT = "Count the words: fish duck egg"
GREEDY = {"temperature": 0}

pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")

RESUME = """
import json, sys
from qwen3_mlx.chat import Chat
chat = Chat.from_pretrained(sys.argv[1], sampling={"temperature": 0})
note = chat.load(sys.argv[2])
restored = list(chat.cache.tokens)
reply = chat.send(sys.argv[3])
reply.text()
print(json.dumps({"note": note, "restored": restored, "prefilled": reply.result.prefilled_tokens,
                  "tokens": list(reply.tokens)}))
"""


@pytest.fixture(scope="module")
def tiny():
    from qwen3_mlx.loading import load

    return load(TINY)


def session(tiny, **kwargs) -> Chat:
    model, tokenizer, generation_config = tiny
    chat = Chat(model, tokenizer, generation_config, sampling=GREEDY, **kwargs)
    for question in QUESTIONS:
        chat.send(question).text()
    return chat


def test_a_saved_cache_resumes_in_a_new_process_exactly(tiny, tmp_path: Path) -> None:
    chat = session(tiny)
    size = chat.save(tmp_path / "conv.json", with_cache=True)
    assert size == cache_path(tmp_path / "conv.json").stat().st_size > 0
    saved = list(chat.cache.tokens)
    # The uninterrupted session goes on ...
    reply = chat.send(NEXT)
    reply.text()
    # ... and a new process resumes from the files.
    done = subprocess.run(
        [sys.executable, "-c", RESUME, str(TINY), str(tmp_path / "conv.json"), NEXT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout.strip().splitlines()[-1])
    assert resumed["note"].startswith("restored the KV cache")
    assert resumed["restored"] == saved
    assert resumed["prefilled"] == reply.result.prefilled_tokens < reply.result.prompt_tokens
    assert resumed["tokens"] == list(reply.tokens)


def test_a_transcript_without_a_cache_file_loads_as_before(tiny, tmp_path: Path) -> None:
    session(tiny).save(tmp_path / "plain.json")
    assert not cache_path(tmp_path / "plain.json").exists()
    model, tokenizer, generation_config = tiny
    again = Chat(model, tokenizer, generation_config)
    assert again.load(tmp_path / "plain.json") is None and len(again.turns) == 3


def fallback(chat: Chat, path: Path, expected: str) -> None:
    note = chat.load(path)
    assert note is not None and expected in note and "prefilled instead" in note
    assert "\n" not in note and chat.cache.tokens == []
    reply = chat.send(NEXT)
    reply.text()
    assert reply.result.prefilled_tokens == reply.result.prompt_tokens  # a full prefill
    assert reply.result.finish_reason != "interrupted"  # a random model may babble on


def test_another_model_dtype_kv_setting_or_template_falls_back(tiny, tmp_path: Path) -> None:
    from qwen3_mlx.loading import load

    session(tiny).save(tmp_path / "conv.json", with_cache=True)
    model, tokenizer, generation_config = tiny
    fallback(
        Chat(model, tokenizer, generation_config, kv_bits=8), tmp_path / "conv.json", "kv bits"
    )
    other = load(make_checkpoint(tmp_path / "random", tokenizer="qwen3-4b"))
    fallback(Chat(*other), tmp_path / "conv.json", "weights")
    bf16 = load(TINY, compute_dtype="bfloat16")
    fallback(Chat(*bf16), tmp_path / "conv.json", "compute dtype")
    changed = load(TINY)
    changed[1].hf.chat_template = changed[1].hf.chat_template.replace("<tools>", "<tools> ")
    fallback(Chat(*changed), tmp_path / "conv.json", "template")


def test_a_damaged_cache_file_falls_back(tiny, tmp_path: Path) -> None:
    session(tiny).save(tmp_path / "conv.json", with_cache=True)
    kv = cache_path(tmp_path / "conv.json")
    kv.write_bytes(kv.read_bytes()[: kv.stat().st_size // 2])
    model, tokenizer, generation_config = tiny
    fallback(Chat(model, tokenizer, generation_config), tmp_path / "conv.json", "damaged")
