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


def rewrite(path: Path, change) -> None:
    """Rewrite a saved cache file: change(arrays, metadata) edits both in place."""
    import mlx.core as mx

    arrays, metadata = mx.load(str(path), return_metadata=True)
    change(arrays, metadata)
    mx.save_safetensors(str(path), arrays, metadata)


def test_a_cache_that_passes_the_header_but_not_the_model_falls_back(tiny, tmp_path: Path) -> None:
    """Issue 27, Medium 7: every array is checked (shape, dtype, finite values) before a reply
    reads it, and a fingerprint nobody could have written is a note too."""
    import mlx.core as mx

    chat = session(tiny)
    chat.save(tmp_path / "conv.json", with_cache=True)
    held = len(chat.cache.tokens)
    kv = cache_path(tmp_path / "conv.json")
    good = kv.read_bytes()
    model, tokenizer, generation_config = tiny

    def head_size_32(arrays, metadata):
        arrays["0.keys.0"] = arrays["0.keys.0"][..., :32]

    def batch_of_2(arrays, metadata):
        arrays["1.values.0"] = mx.concatenate([arrays["1.values.0"]] * 2)

    def float16(arrays, metadata):
        arrays["2.keys.0"] = arrays["2.keys.0"].astype(mx.float16)

    def nan_keys(arrays, metadata):
        arrays["0.keys.0"] = arrays["0.keys.0"] * mx.array(float("nan"))

    cases = [
        (head_size_32, f"0.keys.0 is mlx.core.float32 (1, 2, {held}, 32)"),
        (batch_of_2, f"1.values.0 is mlx.core.float32 (2, 2, {held}, 64)"),
        (float16, "2.keys.0 is mlx.core.float16"),
        (nan_keys, "not finite"),
    ]
    for change, expected in cases:
        kv.write_bytes(good)
        rewrite(kv, change)
        fallback(Chat(model, tokenizer, generation_config), tmp_path / "conv.json", expected)

    def bad_factor(arrays, metadata):
        prints = json.loads(metadata["fingerprint"])
        prints["rope"] = json.dumps({"factor": "abc"})
        metadata["fingerprint"] = json.dumps(prints)

    kv.write_bytes(good)
    rewrite(kv, bad_factor)
    auto = Chat(model, tokenizer, generation_config, auto_rope=True)
    fallback(auto, tmp_path / "conv.json", "saved for another rope")


def test_a_quantized_cache_passes_the_checks_and_restores(tiny, tmp_path: Path) -> None:
    model, tokenizer, generation_config = tiny
    chat = Chat(model, tokenizer, generation_config, sampling=GREEDY, kv_bits=8)
    chat.send(QUESTIONS[0]).text()
    chat.save(tmp_path / "conv.json", with_cache=True)
    again = Chat(model, tokenizer, generation_config, kv_bits=8)
    assert again.load(tmp_path / "conv.json").startswith("restored the KV cache")
    assert again.cache.tokens == chat.cache.tokens
