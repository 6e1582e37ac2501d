"""The real Qwen3 tokenizer through our Tokenizer: llama.cpp's Qwen2 BPE test vectors, the special
tokens, streaming detokenization, and the three chat templates' thinking behaviour."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from checkpoints import FIXTURES, TOKENIZER_CONFIGS, write_tokenizer_files

from qwen3_mlx.errors import CheckpointError
from qwen3_mlx.tokenizer import (
    END_OF_TEXT_ID,
    IM_END_ID,
    IM_START_ID,
    THINK_END_ID,
    THINK_START_ID,
    Tokenizer,
    load_tokenizer,
)

VERIFY = FIXTURES / "verify"


def llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs: .inp cases are separated by a marker line, .out has one line of
    space-separated ids per case."""
    texts = (VERIFY / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    cases = texts.split("\n__ggml_vocab_test__\n")
    assert cases[-1] == ""  # the file ends with a marker
    lines = (VERIFY / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(token) for token in line.split()] for line in lines[:-1]]
    assert len(ids) == len(cases) - 1 == 46
    return list(zip(cases[:-1], ids, strict=True))


VECTORS = llama_cpp_vectors()


def make_tokenizer(folder: Path, variant: str) -> Tokenizer:
    """Our Tokenizer over a folder holding the real files and one tokenizer_config variant."""
    folder.mkdir()
    write_tokenizer_files(folder, variant)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    """One Tokenizer per chat-template variant, loaded once for the module."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {variant: make_tokenizer(root / variant, variant) for variant in TOKENIZER_CONFIGS}


@pytest.fixture(scope="module")
def tokenizer(tokenizers) -> Tokenizer:
    """The current Qwen3-4B tokenizer."""
    return tokenizers["qwen3-4b"]


@pytest.mark.parametrize(
    ("text", "expected"), VECTORS, ids=[f"case{i}" for i in range(len(VECTORS))]
)
def test_llama_cpp_qwen2_vectors(tokenizer, text, expected):
    assert tokenizer.encode(text) == expected


def test_decode_round_trips_the_vectors(tokenizer):
    for text, ids in VECTORS:
        # The tokenizer NFC-normalizes its input, so decoding gives the NFC form back.
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_streaming_detokenizer_holds_partial_utf8(tokenizer):
    """Streamed pieces rebuild decode(), except that mlx-lm's detokenizer drops one leading space
    of the first text (qwen3_mlx.stream relies on that at the start of each section)."""
    for _, ids in VECTORS:
        detokenizer = tokenizer.new_detokenizer()
        detokenizer.reset()
        pieces = []
        for token in ids:
            detokenizer.add_token(token)
            pieces.append(detokenizer.last_segment)
            assert "\ufffd" not in detokenizer.last_segment  # never half a character
        detokenizer.finalize()
        pieces.append(detokenizer.last_segment)
        decoded = tokenizer.decode(ids)
        assert "".join(pieces) == (decoded[1:] if decoded.startswith(" ") else decoded)


def test_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 151669
    hf = tokenizer.hf
    assert hf.convert_tokens_to_ids(["<think>", "</think>"]) == [THINK_START_ID, THINK_END_ID]
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [
        IM_START_ID,
        IM_END_ID,
        END_OF_TEXT_ID,
    ]
    assert tokenizer.encode("<|im_start|>assistant\n") == [IM_START_ID, 77091, 198]
    assert tokenizer.encode("<think>\n\n</think>\n\n") == [THINK_START_ID, 271, THINK_END_ID, 271]
    assert tokenizer.encode("Hello world") == [9707, 1879]


@pytest.mark.parametrize(
    ("variant", "switch", "opens_think"),
    [
        ("qwen3-4b", True, False),
        ("qwen3-4b-original", True, False),
        ("qwen3-4b-thinking-2507", False, True),
    ],
)
def test_template_thinking_behaviour(tokenizers, variant, switch, opens_think):
    tokenizer = tokenizers[variant]
    assert tokenizer.has_thinking_switch is switch
    assert tokenizer.opens_think_in_prompt is opens_think
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.render(messages)
    if opens_think:
        assert prompt[-5:] == [IM_START_ID, 77091, 198, THINK_START_ID, 198]
    else:
        assert prompt[-3:] == [IM_START_ID, 77091, 198]
    if switch:
        no_thinking = tokenizer.render(messages, enable_thinking=False)
        assert no_thinking == prompt + [THINK_START_ID, 271, THINK_END_ID, 271]


def test_render_equals_transformers_apply_chat_template(tokenizers):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "Café 😀?"},
    ]
    for tokenizer in tokenizers.values():
        expected = tokenizer.hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert tokenizer.render(messages) == list(expected)


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(error.value) and "\n" not in str(error.value)


def test_a_prompt_longer_than_transformers_limit_prints_no_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """Issue 27 (CLI audit): the context decides what is too long, in our one line; 3 MB of stdin
    printed transformers' model_max_length warning before it."""
    write_tokenizer_files(tmp_path, "qwen3-4b")
    tokenizer = load_tokenizer(tmp_path)  # a fresh one: transformers warns once per instance
    ids = tokenizer.render([{"role": "user", "content": "a " * 140_000}])
    assert len(ids) > 131_072  # Qwen3's model_max_length
    assert "sequence length" not in capfd.readouterr().err
