"""`qwen3-mlx serve` through the official openai SDK, against the tiny trained model."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from test_server_support import API_KEY, running_server
from typer.testing import CliRunner

from qwen3_mlx.cli.app import app
from qwen3_mlx.errors import SettingsError
from qwen3_mlx.settings import validate_setting

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up the secret word for a key.",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string", "enum": ["apple", "moon", "river"]}},
            "required": ["key"],
        },
    },
}
WORD_COUNT = {
    "type": "function",
    "function": {
        "name": "word_count",
        "description": "Count the words of a text.",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "enum": ["moon river", "apple"]}},
            "required": ["text"],
        },
    },
}
REVERSE = [{"role": "user", "content": "Reverse these words: moon river"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server():
    with running_server(ping_seconds=0.05) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def test_chat_answers_and_splits_reasoning(client):
    reply = client.chat.completions.create(
        model="qwen3-tiny-chat", messages=REVERSE, temperature=0, max_tokens=64
    )
    message = reply.choices[0].message
    assert message.content == "river moon"
    assert message.model_extra["reasoning_content"]  # the think block, split out
    assert "<think>" not in message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0
    # The same request again: the prefix cache serves all of its prompt but what must be recomputed.
    again = client.chat.completions.create(
        model="qwen3-tiny-chat", messages=REVERSE, temperature=0, max_tokens=64
    )
    assert again.choices[0].message.content == "river moon"
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= again.usage.prompt_tokens == reply.usage.prompt_tokens


def test_stream_has_role_first_and_usage_last(client):
    stream = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content", "")
        for c in chunks
        if c.choices
    )
    assert content == "river moon" and reasoning
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # The same prompt again: the prefix cache holds all of it but the last token.
    assert (
        chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
    )


def test_enable_thinking_off_via_extra_body(client):
    reply = client.chat.completions.create(
        model="m", messages=REVERSE, temperature=0, max_tokens=32, extra_body=NO_THINK
    )
    message = reply.choices[0].message
    assert message.content == "river moon"
    assert "reasoning_content" not in (message.model_extra or {})
    for extra in ({"enable_thinking": False}, {"reasoning_effort": "none"}):
        again = client.chat.completions.create(
            model="m", messages=REVERSE, temperature=0, max_tokens=32, extra_body=extra
        )
        assert again.usage.completion_tokens_details.reasoning_tokens == 0


def _call(client, tool_choice, thinking=False, **kwargs):
    return client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What is the secret word for apple?"}],
        tools=[LOOKUP, WORD_COUNT],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=120,
        extra_body=None if thinking else NO_THINK,
        **kwargs,
    )


def test_tool_choice_named_required_none(client):
    named = _call(client, {"type": "function", "function": {"name": "word_count"}})
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "word_count"
    assert json.loads(call.function.arguments)["text"] in ("moon river", "apple")
    required = _call(client, "required")
    assert required.choices[0].message.tool_calls[0].function.name in ("lookup", "word_count")
    none = _call(client, "none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")


def test_tool_round_trip_streamed_and_not(client):
    # Thinking on: the reasoning goes back too, so the template re-renders the reply exactly
    # (with thinking off the template drops its injected empty think block from history).
    first = _call(
        client,
        {"type": "function", "function": {"name": "lookup"}},
        thinking=True,
        parallel_tool_calls=False,  # the reply ends at its call, as the template renders it back
    )
    message = first.choices[0].message
    call = message.tool_calls[0]
    streamed = list(
        _call(client, {"type": "function", "function": {"name": "lookup"}}, True, stream=True)
    )
    deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert all(d.index == 0 for d in deltas)
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "lookup"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    history = [
        {"role": "user", "content": "What is the secret word for apple?"},
        {
            "role": "assistant",
            "content": message.content,
            "reasoning_content": message.model_extra["reasoning_content"],
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "castle"},
    ]
    answer = client.chat.completions.create(
        model="m",
        messages=history,
        tools=[LOOKUP, WORD_COUNT],
        temperature=0,
        max_tokens=60,
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # Reasoning went back as returned: the first prompt and the reasoning were reused. (Not the
    # whole reply: the tiny model writes four newlines before a forced call, the template two.)
    reused = first.usage.prompt_tokens + first.usage.completion_tokens_details.reasoning_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens >= reused


def test_tool_results_reordered_by_call_id(client, server):
    calls = [
        {
            "id": "b",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"key": "moon"}'},
        },
        {
            "id": "a",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"key": "apple"}'},
        },
    ]
    messages = [
        {"role": "user", "content": "Secret words for moon and apple?"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "id": "a", "content": "APPLE-RESULT"},  # Qwen-Agent's `id`
        {"role": "tool", "tool_call_id": "b", "content": "MOON-RESULT"},
    ]
    body = {"messages": messages, "tools": [LOOKUP]}
    prompt = httpx.post(
        server[0] + "/apply-template", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()["prompt"]
    assert prompt.index("MOON-RESULT") < prompt.index("APPLE-RESULT")


def test_response_format_json_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "word": {"type": "string", "enum": ["moon", "river"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["word", "count"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=40,
        extra_body=NO_THINK,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content)
    assert data["word"] in ("moon", "river") and 0 <= data["count"] <= 9
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs(client):
    reply = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=32,
        extra_body=NO_THINK,
        logprobs=True,
        top_logprobs=3,
    )
    entries = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in entries) == reply.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_stop_strings_cut_the_answer(client):
    reply = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=32,
        extra_body=NO_THINK,
        stop=[" moon"],
    )
    assert reply.choices[0].message.content == "river"
    assert reply.choices[0].finish_reason == "stop"


def test_errors_are_sdk_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as bad_n:
        client.chat.completions.create(model="m", messages=REVERSE, n=2)
    assert bad_n.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad_temperature:
        client.chat.completions.create(model="m", messages=REVERSE, temperature=5)
    assert bad_temperature.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=REVERSE, tool_choice="required")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.get("/nowhere", cast_to=object)
    too_long = [{"role": "user", "content": "moon " * 50_000}]
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model="m", messages=too_long)
    assert overflow.value.code == "context_length_exceeded"
    # The engine's ContextOverflowError, in its own words (the REPL says the same).
    assert overflow.value.body["param"] == "messages"
    # The engine's numbers in OpenAI's sentence, which clients match (test_server_clients.py).
    assert overflow.value.body["message"].startswith("This model's maximum context length is ")


@pytest.mark.parametrize(
    ("name", "value", "flag"),
    [
        ("temperature", 5, "--temp"),
        ("top_p", 0, "--top-p"),
        ("top_k", 2.5, "--top-k"),
        ("frequency_penalty", 3, "--frequency-penalty"),
        ("seed", "soon", "--seed"),
    ],
)
def test_a_bad_setting_gets_the_same_words_from_the_server_and_the_cli(client, name, value, flag):
    with pytest.raises(SettingsError) as caught:
        validate_setting(name, value)
    words = str(caught.value)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=REVERSE, extra_body={name: value})
    assert refused.value.body["message"] == words and refused.value.body["param"] == name
    usage = CliRunner().invoke(app, ["prompt", "hi", flag, str(value)])
    assert usage.exit_code == 2 and usage.stderr.splitlines()[-1].endswith(": " + words)


def test_the_request_schema_shows_each_setting_as_settings_describes_it(server):
    schema = httpx.get(server[0] + "/openapi.json").json()["components"]["schemas"]
    fields = schema["ChatCompletionRequest"]["properties"]
    assert fields["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert fields["frequency_penalty"]["anyOf"][0] == {
        "type": "number",
        "minimum": -2,
        "maximum": 2,
    }
    assert fields["max_completion_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1}


def test_a_full_queue_answers_503(client, server):
    worker = server[1].worker
    bounds = worker.max_batch, worker.max_queue
    worker.max_batch = worker.max_queue = 0  # the batch and the queue are full
    try:
        with pytest.raises(openai.InternalServerError) as busy:
            client.chat.completions.create(model="m", messages=REVERSE, max_tokens=4)
    finally:
        worker.max_batch, worker.max_queue = bounds
    assert busy.value.status_code == 503 and busy.value.body["type"] == "server_busy"


def test_unknown_fields_are_ignored(client):
    reply = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=32,
        extra_body={**NO_THINK, "mirostat": 2},
    )
    assert reply.choices[0].message.content == "river moon"


def test_models_health_metrics_tokenize_completions(client, server):
    url, state = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert [m.id for m in client.models.list()] == ["qwen3-tiny-chat"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    ids = httpx.post(url + "/tokenize", json={"prompt": "moon river"}, headers=headers).json()
    assert ids["tokens"] == state.tokenizer.encode("moon river")
    completion = client.completions.create(model="m", prompt="moon", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens <= 4
    metrics = httpx.get(url + "/metrics", headers=headers).text
    for name in (
        "qwen3_mlx_requests_total",
        "qwen3_mlx_prefix_cache_hits_total",
        "qwen3_mlx_queue_depth",
        "qwen3_mlx_time_to_first_token_seconds_bucket",
    ):
        assert name in metrics


def test_keep_alive_comments_while_queued(server):
    """A stream waiting for a place in the batch gets `: ping` comments before its first token."""
    url, state = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": REVERSE, "temperature": 0.6, "seed": 1, "max_tokens": 200, "stream": True}
    batch, state.worker.max_batch = state.worker.max_batch, 1  # the second waits for the first
    try:
        with httpx.Client(timeout=60) as http:
            lines = []
            chat = url + "/v1/chat/completions"
            with http.stream("POST", chat, json=body, headers=headers) as first:
                with http.stream("POST", chat, json=body, headers=headers) as second:
                    for line in second.iter_lines():
                        lines.append(line)
                for _ in first.iter_lines():
                    pass
    finally:
        state.worker.max_batch = batch
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert any(line.startswith(":") for line in lines)


def test_requests_are_prepared_off_the_event_loop(server, monkeypatch):
    """/health answers while a request is being rendered (it would wait if the loop did it)."""
    from qwen3_mlx.server import app

    url, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    answered = threading.Event()
    check_size = app.check_size

    def slow_check(*args: Any) -> None:
        assert answered.wait(20), "/health did not answer while a request was prepared"
        check_size(*args)

    monkeypatch.setattr(app, "check_size", slow_check)
    with ThreadPoolExecutor(2) as pool:
        bodies = [
            ("/v1/chat/completions", {"messages": REVERSE, "max_tokens": 2}),
            ("/tokenize", {"messages": REVERSE}),
        ]
        pending = [
            pool.submit(httpx.post, url + path, json=body, headers=headers, timeout=30)
            for path, body in bodies
        ]
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        answered.set()
        assert [future.result().status_code for future in pending] == [200, 200]


def test_tool_grammars_are_kept_with_a_bound(client, server):
    grammars = server[1].grammars
    bound, grammars.max_entries = grammars.max_entries, 2
    try:
        for name in ("first", "second", "third", "first"):
            tool = {"type": "function", "function": {**LOOKUP["function"], "name": name}}
            reply = client.chat.completions.create(
                model="m",
                messages=REVERSE,
                tools=[tool],
                tool_choice="required",
                max_tokens=32,
                extra_body=NO_THINK,
            )
            assert reply.choices[0].message.tool_calls[0].function.name == name
            assert len(grammars) <= 2
    finally:
        grammars.max_entries = bound
