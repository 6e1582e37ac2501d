"""Transcripts: save, validate, load, and continue where the conversation left off."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from chat_fakes import ScriptedModel, load_fixture_tokenizer

from qwen3_mlx.chat import Chat
from qwen3_mlx.errors import TemplateError, TranscriptError
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.transcript import TRANSCRIPT_FORMAT, TRANSCRIPT_VERSION

pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")


def script(user: str) -> str:
    word = user.split()[0]
    if "/no_think" in user:
        return f"<think>\n\n</think>\n\n{word}!<|im_end|>"
    return f"<think>\nThinking about {word}.\n</think>\n\nSaid {word}.<|im_end|>"


def new_chat(variant: str = "qwen3-4b", **kwargs) -> Chat:
    tokenizer = load_fixture_tokenizer(variant)
    kwargs.setdefault("sampling", {"temperature": 0})
    return Chat(ScriptedModel(tokenizer, script), tokenizer, GenerationConfig(), **kwargs)


def test_save_then_load_then_continue(tmp_path: Path) -> None:
    chat = new_chat(system="Be terse.", model_id="tiny/model")
    chat.set("max_tokens", 64)
    for text in ("apple", "pear /no_think"):
        list(chat.send(text))
    reply = chat.send("plum")
    events = iter(reply)
    next(events), next(events)
    reply.close()  # an interrupted turn is saved as such
    path = tmp_path / "chat.json"
    chat.save(path)

    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == TRANSCRIPT_FORMAT and document["version"] == TRANSCRIPT_VERSION
    assert document["model_id"] == "tiny/model"
    assert document["messages"] == chat.messages
    assert [t["thinking"] for t in document["turns"]] == [
        "Thinking about apple.",
        "",
        chat.turns[2].thinking,
    ]
    assert document["turns"][2]["interrupted"] is True
    assert document["explicit_settings"] == {"temperature": 0.0, "max_tokens": 64}
    assert document["settings"]["top_k"] == 20
    assert "Thinking about" not in json.dumps(document["messages"])

    tokenizer = load_fixture_tokenizer("qwen3-4b")
    model = ScriptedModel(tokenizer, script)
    loaded = Chat(model, tokenizer, GenerationConfig(), model_id="tiny/model")
    loaded.load(path)
    assert loaded.messages == chat.messages and loaded.turns == chat.turns
    assert loaded.system == "Be terse." and loaded.model_id == "tiny/model"
    assert loaded.explicit_settings == chat.explicit_settings and loaded.settings == chat.settings
    reply = loaded.send("fig")
    assert reply.text() == "Said fig."
    # The whole history was prefilled into the new model, and it matched the script's context.
    assert reply.result.prefilled_tokens == reply.result.prompt_tokens
    assert [t.user for t in loaded.turns] == ["apple", "pear /no_think", "plum", "fig"]


def test_chat_load_replaces_the_conversation(tmp_path: Path) -> None:
    first = new_chat(thinking=False)
    first.system = "S"
    list(first.send("kiwi /no_think"))
    first.save(tmp_path / "a.json")
    other = new_chat()
    list(other.send("lime"))
    other.load(tmp_path / "a.json")
    assert other.messages == first.messages and other.thinking is False and other.system == "S"
    assert other.send("plum /no_think").text() == "plum!"


def test_loading_a_no_thinking_transcript_into_2507_is_refused(tmp_path: Path) -> None:
    chat = new_chat(thinking=False)
    chat.save(tmp_path / "t.json")
    with pytest.raises(TemplateError):
        new_chat("qwen3-4b-thinking-2507").load(tmp_path / "t.json")


def good_document() -> dict:
    return {
        "format": TRANSCRIPT_FORMAT,
        "version": 1,
        "model_id": "m",
        "system": None,
        "thinking": True,
        "explicit_settings": {},
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "turns": [{"thinking": "", "thinking_finished": True, "finish_reason": "stop"}],
    }


def corrupt(document: dict, path: list, value: object) -> dict:
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ((["format"], "something-else"), "not a qwen3-mlx-transcript file"),
        ((["version"], 99), "version 99 is newer"),
        ((["version"], KeyError), "no version number"),
        ((["messages"], "nope"), "'messages' must be a list"),
        ((["messages", 1, "role"], "user"), "must be an assistant message"),
        ((["messages", 0, "content"], 5), "must be a user message with text content"),
        ((["turns"], []), "one record per assistant message"),
        ((["turns", 0, "finish_reason"], "exploded"), "unknown finish_reason"),
        ((["explicit_settings"], {"temperature": 9}), "bad settings (temperature must be in"),
        ((["thinking"], "yes"), "'thinking' must be true or false"),
        ((["system"], "other"), None),  # the system message check below
    ],
)
def test_bad_transcripts_raise_one_line(
    tmp_path: Path, change: tuple, fragment: str | None
) -> None:
    document = corrupt(good_document(), *change)
    if fragment is None:
        fragment = "the system message differs"
        document["system"] = "other"
        document["messages"].insert(0, {"role": "system", "content": "different"})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(TranscriptError) as caught:
        new_chat().load(path)
    message = str(caught.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_unreadable_and_non_json_files(tmp_path: Path) -> None:
    chat = new_chat()
    with pytest.raises(TranscriptError, match="cannot read"):
        chat.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_bytes(b"{not json")
    with pytest.raises(TranscriptError, match="not a JSON transcript"):
        chat.load(tmp_path / "junk.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(TranscriptError, match="expected a JSON object"):
        chat.load(tmp_path / "list.json")
    with pytest.raises(TranscriptError, match="cannot write"):
        chat.save(tmp_path / "no" / "such" / "dir.json")


def test_a_failed_load_leaves_the_chat_as_it_was(tmp_path: Path) -> None:
    chat = new_chat()
    list(chat.send("apple"))
    before = chat.messages
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(TranscriptError):
        chat.load(tmp_path / "junk.json")
    assert chat.messages == before


def test_saving_onto_a_folder_fails_in_one_line_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    chat = new_chat()
    chat.send("apple").text()
    target = tmp_path / "folder.json"
    target.mkdir()
    with pytest.raises(TranscriptError, match="it is a folder"):
        chat.save(target)
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


def test_saving_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    chat = new_chat()
    chat.send("apple").text()
    shared = tmp_path / "shared.json"
    shared.write_text("{}")
    shared.chmod(0o640)
    chat.save(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640 and "apple" in shared.read_text()
    fresh = tmp_path / "new.json"
    chat.save(fresh)  # a new transcript is private: it holds a conversation
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
