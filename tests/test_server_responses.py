"""POST /v1/responses through the openai SDK's `responses.create` and openai-agents' default model,
unchanged, against the tiny trained model."""

from __future__ import annotations

import json

import agents
import httpx
import openai
import pytest
from test_server_openai import LOOKUP as CHAT_LOOKUP
from test_server_support import API_KEY, agents_lookup_tool, running_server

from qwen3_mlx.server.requests import ApiError
from qwen3_mlx.server.responses import ResponseStore

LOOKUP = {"type": "function", **CHAT_LOOKUP["function"]}  # the Responses API's flat shape
REVERSE = "Reverse these words: moon river"
SECRET = "What is the secret word for apple?"
TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def server():
    with running_server() as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def _kinds(events: list, start: str, end: str) -> list[str]:
    """The event types from the first `start` to the first `end` after it, deltas left out."""
    types = [event.type for event in events if not event.type.endswith(".delta")]
    first = types.index(start)
    return types[first : types.index(end, first) + 1]


def test_text_streamed_and_not_with_reasoning(client, server):
    plain = client.responses.create(model="m", input=REVERSE, temperature=0, max_output_tokens=64)
    assert plain.status == "completed" and plain.output_text == "river moon"
    reasoning, message = plain.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    assert message.type == "message" and message.status == "completed"
    assert plain.usage.output_tokens_details.reasoning_tokens > 0
    events = list(
        client.responses.create(
            model="m", input=REVERSE, temperature=0, max_output_tokens=64, stream=True
        )
    )
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [event.type for event in events[:2]] == ["response.created", "response.in_progress"]
    assert _kinds(events, "response.output_item.added", "response.output_item.done") == [
        *TEXT_EVENTS[:2],
        "response.reasoning_text.done",
        *TEXT_EVENTS[2:],
    ]
    assert _kinds(events[4:], "response.output_item.added", "response.completed") == [
        *TEXT_EVENTS[:2],
        "response.output_text.done",
        *TEXT_EVENTS[2:],
        "response.completed",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    thoughts = [event.delta for event in events if event.type == "response.reasoning_text.delta"]
    completed = events[-1].response
    assert "".join(deltas) == completed.output_text == "river moon"
    assert "".join(thoughts) == reasoning.content[0].text
    # The same prompt again: the prefix cache holds all of it but the last token.
    assert completed.usage.input_tokens_details.cached_tokens == completed.usage.input_tokens - 1
    # Named SSE events, as OpenAI sends them.
    body = {"model": "m", "input": REVERSE, "max_output_tokens": 2, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    wire = httpx.post(server[0] + "/v1/responses", json=body, headers=headers).text
    assert wire.startswith("event: response.created\r\ndata: {")


def test_thinking_off_instructions_and_json_schema(client):
    schema = {
        "type": "object",
        "properties": {"word": {"type": "string", "enum": ["moon", "river"]}},
        "required": ["word"],
        "additionalProperties": False,
    }
    reply = client.responses.create(
        model="m",
        instructions="You are a helpful assistant.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": REVERSE}]}],
        reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "w", "schema": schema}},
        temperature=0,
        max_output_tokens=24,
    )
    assert [item.type for item in reply.output] == ["message"]
    assert json.loads(reply.output_text)["word"] in ("moon", "river")
    assert reply.usage.output_tokens_details.reasoning_tokens == 0
    named = client.responses.create(
        model="m",
        input=REVERSE,
        tools=[LOOKUP],
        tool_choice={"type": "function", "name": "lookup"},
        reasoning={"effort": "none"},
        max_output_tokens=40,
    )
    assert [item.type for item in named.output] == ["function_call"]
    assert named.output[0].name == "lookup" and named.tool_choice.name == "lookup"
    cut = client.responses.create(model="m", input=REVERSE, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3


def test_tool_loop_streamed_then_by_previous_response_id(client, server):
    events = list(
        client.responses.create(
            model="m",
            input=SECRET,
            tools=[LOOKUP],
            include=["reasoning.encrypted_content"],
            temperature=0,
            max_output_tokens=80,
            stream=True,
        )
    )
    first = events[-1].response
    reasoning, call = first.output
    assert call.type == "function_call" and call.name == "lookup" and call.status == "completed"
    assert json.loads(call.arguments) == {"key": "apple"}
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(pieces) == done[0].arguments == call.arguments
    assert client.responses.retrieve(first.id).output[-1].call_id == call.call_id
    metrics = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'endpoint="/v1/responses/{response_id}",status="200"' in metrics
    assert first.id not in metrics  # one label for every id
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "castle"}
    answer = client.responses.create(
        model="m",
        previous_response_id=first.id,
        input=[result],
        tools=[LOOKUP],
        temperature=0,
        max_output_tokens=60,
    )
    assert answer.output_text == "The secret word for apple is castle."
    # The stored turn re-renders exactly as the model wrote it, reasoning included.
    assert answer.usage.input_tokens_details.cached_tokens == first.usage.total_tokens
    # A client that keeps no state sends the reasoning back sealed, without its content, as
    # Codex does: the same prompt again, the same answer.
    sealed = reasoning.model_dump(include={"type", "id", "summary", "encrypted_content"})
    history = [{"role": "user", "content": SECRET}, sealed, call.model_dump(), result]
    stateless = client.responses.create(
        model="m", input=history, tools=[LOOKUP], store=False, temperature=0, max_output_tokens=60
    )
    assert stateless.output_text == answer.output_text
    assert stateless.usage.input_tokens == answer.usage.input_tokens
    # Without encrypted reasoning the call comes back bare; the model still thinks and answers.
    bare = client.responses.create(
        model="m",
        input=[history[0], *history[2:]],
        tools=[LOOKUP],
        store=False,
        temperature=0,
        max_output_tokens=60,
    )
    assert bare.output_text == answer.output_text and bare.output[0].type == "reasoning"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model="m", previous_response_id=first.id, input=[result])
    assert gone.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):  # store: false kept nothing
        client.responses.retrieve(stateless.id)


def test_refusals_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as hosted:
        client.responses.create(model="m", input=REVERSE, tools=[{"type": "web_search"}])
    assert hosted.value.body["param"] == "tools"
    image = {"type": "input_image", "image_url": "http://example.invalid/a.png"}
    with pytest.raises(openai.BadRequestError) as picture:
        client.responses.create(model="m", input=[{"role": "user", "content": [image]}])
    assert "input_image" in picture.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="m", input=REVERSE, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.responses.create(model="m", input="moon " * 50_000)
    assert overflow.value.code == "context_length_exceeded"
    assert overflow.value.body["param"] == "input"


def test_openai_agents_default_model_tool_loop(server):
    asked: list[str] = []
    lookup = agents_lookup_tool(asked, "castle")
    agents.set_tracing_disabled(True)
    model_client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)
    agents.set_default_openai_client(model_client, use_for_tracing=False)
    settings = agents.ModelSettings(temperature=0, max_tokens=80)
    agent = agents.Agent(name="a", model="qwen3-tiny-chat", tools=[lookup], model_settings=settings)
    result = agents.Runner.run_sync(agent, SECRET)
    assert asked == ["apple"]
    assert result.final_output == "The secret word for apple is castle."
    first, second = result.raw_responses
    # Thinking on: the agent sends the reasoning items back, so the loop hits the prefix cache.
    assert second.usage.input_tokens_details.cached_tokens == first.usage.total_tokens


def test_the_store_keeps_the_newest_responses():
    store = ResponseStore(limit=2)
    for name in ("a", "b", "c"):
        output = [{"type": "message", "role": "assistant", "content": name}]
        store.put({"id": name, "output": output}, [{"role": "user", "content": "?"}])
    store.conversation("b")  # used: now the newest
    store.put({"id": "d", "output": []}, [])
    with pytest.raises(ApiError) as evicted:
        store.conversation("a")
    assert evicted.value.status == 404 and "newest 2 responses" in str(evicted.value)
    with pytest.raises(ApiError):
        store.response("c")
    assert [item["content"] for item in store.conversation("b")] == ["?", "b"]


def test_a_reply_that_fails_ends_the_stream_with_response_failed(client, monkeypatch):
    import qwen3_mlx.server.worker as worker

    def broken(*args, **kwargs):
        raise RuntimeError("the decoder broke")

    monkeypatch.setattr(worker, "start_reply", broken)
    events = list(client.responses.create(model="m", input=REVERSE, stream=True))
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert "the decoder broke" in events[-1].response.error.message
    with pytest.raises(openai.InternalServerError, match="the decoder broke"):
        client.responses.create(model="m", input=REVERSE)
