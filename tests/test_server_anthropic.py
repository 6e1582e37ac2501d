"""POST /v1/messages and /v1/messages/count_tokens through the anthropic SDK, unchanged, against
the tiny trained model."""

from __future__ import annotations

import anthropic
import pytest
from pydantic_ai import Agent
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from test_server_openai import LOOKUP as CHAT_LOOKUP
from test_server_support import API_KEY, running_server

FUNCTION = CHAT_LOOKUP["function"]
LOOKUP = {
    "name": "lookup",
    "description": FUNCTION["description"],
    "input_schema": FUNCTION["parameters"],
}
REVERSE = [{"role": "user", "content": "Reverse these words: moon river"}]
SECRET = [{"role": "user", "content": "What is the secret word for apple?"}]
GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more: sent as extra body


@pytest.fixture(scope="module")
def client():
    with running_server() as (url, _state):
        yield anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0)


def test_message_with_thinking_then_stream_then_thinking_off(client):
    message = client.messages.create(
        model="m", max_tokens=64, messages=REVERSE, system="Be brief.", extra_body=GREEDY
    )
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking
    assert text.type == "text" and text.text == "river moon"
    assert message.stop_reason == "end_turn" and message.role == "assistant"
    counted = client.messages.count_tokens(model="m", messages=REVERSE, system="Be brief.")
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens
    with client.messages.stream(
        model="m", max_tokens=64, messages=REVERSE, system="Be brief.", extra_body=GREEDY
    ) as stream:
        kinds = [event.type for event in stream if not event.type.endswith("delta")]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    assert [block.model_dump() for block in streamed.content] == [
        block.model_dump() for block in message.content
    ]
    # The same prompt again: the cache held all of it but the last token.
    assert streamed.usage.input_tokens == 1
    assert streamed.usage.cache_read_input_tokens == counted.input_tokens - 1
    off = client.messages.create(
        model="m", max_tokens=32, messages=REVERSE, thinking={"type": "disabled"}, extra_body=GREEDY
    )
    assert [block.type for block in off.content] == ["text"]
    assert off.content[0].text == "river moon"


def test_stop_sequences_and_max_tokens(client):
    off = {"type": "disabled"}
    cut = client.messages.create(
        model="m", max_tokens=32, messages=REVERSE, thinking=off, stop_sequences=[" moon"]
    )
    assert cut.content[0].text == "river"
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == " moon"
    short = client.messages.create(model="m", max_tokens=3, messages=REVERSE)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_tool_choice_any_and_none(client):
    off = {"type": "disabled"}
    forced = client.messages.create(
        model="m", max_tokens=40, messages=REVERSE, tools=[LOOKUP], tool_choice={"type": "any"},
        thinking=off,
    )  # fmt: skip
    assert forced.stop_reason == "tool_use" and forced.content[-1].name == "lookup"
    barred = client.messages.create(
        model="m", max_tokens=40, messages=SECRET, tools=[LOOKUP], tool_choice={"type": "none"},
        thinking=off,
    )  # fmt: skip
    assert barred.stop_reason in ("end_turn", "max_tokens")
    assert {block.type for block in barred.content} == {"text"}


def test_tool_use_round_trip_streamed(client):
    with client.messages.stream(
        model="m", max_tokens=80, messages=SECRET, tools=[LOOKUP], extra_body=GREEDY
    ) as stream:
        partial = "".join(
            event.delta.partial_json
            for event in stream
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
        )
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    thinking, call = first.content
    assert thinking.type == "thinking" and call.type == "tool_use" and call.name == "lookup"
    assert call.input == {"key": "apple"} and partial == '{"key": "apple"}'
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "castle"}
    history = [*SECRET, {"role": "assistant", "content": first.content}]
    answer = client.messages.create(
        model="m",
        max_tokens=60,
        messages=[*history, {"role": "user", "content": [result]}],
        tools=[LOOKUP],
        extra_body=GREEDY,
    )
    assert answer.content[-1].text == "The secret word for apple is castle."
    # Thinking and tool_use went back as returned: the whole first turn was reused.
    turn = first.usage
    held = turn.input_tokens + turn.cache_read_input_tokens + turn.output_tokens
    assert answer.usage.cache_read_input_tokens == held


def test_errors_in_anthropic_shape(client):
    with pytest.raises(anthropic.BadRequestError) as missing:
        client.messages.create(model="m", max_tokens=0, messages=REVERSE)
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": missing.value.body["error"]["message"],
        },
    }
    assert "max_tokens" in missing.value.message
    image = {"type": "image", "source": {"type": "url", "url": "http://example.invalid/a.png"}}
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported"):
        client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": [image]}]
        )
    server_tool = {"type": "web_search_20250305", "name": "web_search"}
    with pytest.raises(anthropic.BadRequestError, match="server tool"):
        client.messages.create(model="m", max_tokens=8, messages=REVERSE, tools=[server_tool])
    wrong = anthropic.Anthropic(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="m", max_tokens=8, messages=REVERSE)
    assert denied.value.body["error"]["type"] == "authentication_error"


def test_a_reply_that_fails_ends_the_stream_with_an_error_event(client, monkeypatch):
    import qwen3_mlx.server.worker as worker

    def broken(*args, **kwargs):
        raise RuntimeError("the decoder broke")

    monkeypatch.setattr(worker, "start_reply", broken)
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client.messages.stream(model="m", max_tokens=8, messages=REVERSE) as stream:
            list(stream)
    assert failed.value.body["error"]["type"] == "api_error"
    assert "the decoder broke" in failed.value.body["error"]["message"]
    with pytest.raises(anthropic.InternalServerError, match="the decoder broke"):
        client.messages.create(model="m", max_tokens=8, messages=REVERSE)


def test_pydantic_ai_anthropic_tool_loop_in_thinking_mode(client):
    """pydantic-ai sends back only signed thinking; unsigned, it became a user message and the
    tiny model answered wrong."""
    provider = AnthropicProvider(base_url=str(client.base_url), api_key=API_KEY)
    settings = {
        "temperature": 0,
        "max_tokens": 80,
        # pydantic-ai drops sampling settings for Anthropic's newest API version.
        "extra_headers": {"anthropic-version": "2023-06-01"},
    }
    agent = Agent(AnthropicModel("qwen3-tiny-chat", provider=provider), model_settings=settings)
    asked: list[str] = []

    @agent.tool_plain
    def lookup(key: str) -> str:
        """Look up the secret word for a key."""
        asked.append(key)
        return "castle"

    result = agent.run_sync("What is the secret word for apple?")
    assert asked == ["apple"]
    assert result.output == "The secret word for apple is castle."
    first, second = (message.usage for message in result.all_messages()[1::2])
    # pydantic-ai counts cache reads in input_tokens: the whole first turn was reused.
    assert second.cache_read_tokens == first.input_tokens + first.output_tokens
