"""The bugs real clients hit (issue 25), each through the client that hit it: the openai SDK,
pydantic-ai's tool loop, plain HTTP as curl sends it, and a browser's CORS preflight."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import openai
import pytest
from test_server_openai import LOOKUP, NO_THINK, REVERSE
from test_server_support import (
    API_KEY,
    TINY_MODEL,
    agents_lookup_tool,
    running_server,
    tiny_model,
)

from qwen3_mlx.server.runner import served_model_id

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tiny_model"))
from tiny_data import TOOLS  # noqa: E402  (the tiny model's own tool definitions)

ORIGIN = "http://app.example"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
SECRET_MOON = [{"role": "user", "content": "What is the secret word for moon?"}]


@pytest.fixture(scope="module")
def server():
    with running_server(cors_origins=(ORIGIN,)) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def requests_sent() -> list[str]:
    return []


@pytest.fixture(scope="module")
def client(server, requests_sent) -> openai.OpenAI:
    """The SDK with its default retries, counting the requests it really sends."""
    http = httpx.Client(event_hooks={"request": [lambda r: requests_sent.append(r.url.path)]})
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, http_client=http)


def test_an_invalid_tool_schema_is_a_400_naming_the_tool(client, requests_sent):
    """Bug 1: a 400 with `param` (not a 500 the SDK retries), streamed or not."""
    bad = {"type": "function", "function": {"name": "x", "parameters": BAD_SCHEMA}}
    for stream in (False, True):
        requests_sent.clear()
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="m", messages=REVERSE, tools=[LOOKUP, bad], stream=stream
            )
        assert len(requests_sent) == 1  # not retried
        body = refused.value.body
        assert body["param"] == "tools[1].function.parameters"
        assert "nonsense" in body["message"] and "start:" not in body["message"]
    requests_sent.clear()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="m",
            messages=REVERSE,
            stream=True,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": BAD_SCHEMA},
            },
        )
    assert refused.value.body["param"] == "response_format" and len(requests_sent) == 1


def test_tool_choice_none_never_closes_a_call(client):
    """Bug 2: with these seeds the tiny model wrote a call's body and `</tool_call>` as content."""
    for seed in (5, 12, 31):
        reply = client.chat.completions.create(
            model="m",
            messages=SECRET_MOON,
            tools=[LOOKUP],
            tool_choice="none",
            seed=seed,
            max_tokens=120,
        )
        assert "</tool_call>" not in reply.choices[0].message.content
        assert reply.choices[0].message.tool_calls is None


def _history(arguments) -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
    return [
        *SECRET_MOON,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "The user wants the secret word for moon, so I call lookup.",
            "tool_calls": [call],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "castle"},
    ]


def test_history_arguments_are_rendered_as_the_template_writes_them(server):
    """Bug 3: compact, re-spaced or object arguments render as the model wrote them; text that
    is not a JSON object stays as sent."""
    prompts = [
        httpx.post(
            server[0] + "/apply-template",
            json={"messages": _history(arguments), "tools": [LOOKUP]},
            headers=HEADERS,
        ).json()["prompt"]
        for arguments in ('{"key": "moon"}', '{"key":"moon"}', '{ "key" :"moon" }', {"key": "moon"})
    ]
    assert (
        len(set(prompts)) == 1 and '{"name": "lookup", "arguments": {"key": "moon"}}' in prompts[0]
    )
    broken = httpx.post(
        server[0] + "/apply-template", json={"messages": _history('{"key":')}, headers=HEADERS
    ).json()["prompt"]
    assert '"arguments": {"key":}' in broken


def test_arguments_as_an_object_are_accepted(client):
    """Bug 3: `arguments` as an object was a 400."""
    reply = client.chat.completions.create(
        model="m", messages=_history({"key": "moon"}), tools=[LOOKUP], temperature=0, max_tokens=40
    )
    assert reply.choices[0].message.content == "The secret word for moon is castle."


def test_pydantic_ai_tool_loop_in_thinking_mode(server):
    """Bug 3 with the client that hit it: pydantic-ai sends the call back as `{"key":"moon"}`;
    the model must see the call it wrote, and the prefix cache must hold through it."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=server[0] + "/v1", api_key=API_KEY)
    agent = Agent(
        OpenAIChatModel("qwen3-tiny-chat", provider=provider),
        model_settings={"temperature": 0, "max_tokens": 200},
    )

    @agent.tool_plain
    def lookup(key: str) -> str:
        """Look up the secret word for a word

        Args:
            key: The word to look up
        """
        return {"moon": "castle", "river": "dragon"}[key]

    for key, word in (("moon", "castle"), ("river", "dragon")):
        result = agent.run_sync(f"What is the secret word for {key}?")
        assert result.output == f"The secret word for {key} is {word}."
        requests = [m for m in result.all_messages() if m.kind == "response"]
        assert requests[0].parts[0].part_kind == "thinking"  # thinking mode, sent back
        first, second = requests[0].usage, requests[1].usage
        # The second prompt re-renders the first reply as the model wrote it, call included.
        assert second.cache_read_tokens >= first.input_tokens + first.output_tokens - 8


def _call_turn_without_reasoning(question: str, name: str, arguments: dict) -> list[dict]:
    """The history a client that drops reasoning_content sends back after the model's call."""
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]


def test_thinking_tool_loop_with_the_call_turn_sent_back_without_reasoning(client, server):
    """Clients that drop reasoning_content (langchain-openai, openai-agents, `llm`) send the call
    turn back bare; in thinking mode the template then renders it without a think block, and the
    model still thinks and answers from the result."""
    cases = [
        ("What is the secret word for moon?", TOOLS["lookup"], {"key": "moon"}, "castle"),
        ("Find the secret word for fish", TOOLS["lookup"], {"key": "fish"}, "lake"),  # held out
        ("Count the words: apple tree star", TOOLS["word_count"], {"text": "apple tree star"}, "3"),
    ]
    expected = [
        "The secret word for moon is castle.",
        "The secret word for fish is lake.",
        "There are 3 words.",
    ]
    for (question, tool, arguments, result), answer in zip(cases, expected, strict=True):
        messages = _call_turn_without_reasoning(
            question, tool["function"]["name"], json.dumps(arguments)
        )
        messages.append({"role": "tool", "tool_call_id": "c1", "content": result})
        prompt = httpx.post(
            server[0] + "/apply-template",
            json={"messages": messages, "tools": [tool]},
            headers=HEADERS,
        ).json()["prompt"]
        assert "<think>" not in prompt and "<|im_start|>assistant\n<tool_call>\n" in prompt
        reply = client.chat.completions.create(
            model="m", messages=messages, tools=[tool], temperature=0, max_tokens=80
        )
        message = reply.choices[0].message
        assert message.content == answer and message.tool_calls is None
        assert message.model_extra["reasoning_content"]  # thinking mode: it thought first


def test_openai_agents_chat_completions_model_drops_reasoning_and_answers(server):
    """openai-agents' chat-completions model replays reasoning_content only to DeepSeek models,
    so its second request carries the call turn without it; the loop still ends right."""
    import agents

    bodies: list[dict] = []

    async def record(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))

    http = httpx.AsyncClient(event_hooks={"request": [record]})
    client = openai.AsyncOpenAI(
        base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, http_client=http
    )
    asked: list[str] = []
    agents.set_tracing_disabled(True)
    agent = agents.Agent(
        name="a",
        model=agents.OpenAIChatCompletionsModel("qwen3-tiny-chat", client),
        tools=[agents_lookup_tool(asked, "dragon")],
        model_settings=agents.ModelSettings(temperature=0, max_tokens=120),
    )
    result = agents.Runner.run_sync(agent, "What is the secret word for river?")
    assert asked == ["river"]
    assert result.final_output == "The secret word for river is dragon."
    call_turn = bodies[1]["messages"][1]
    assert call_turn["role"] == "assistant" and call_turn["tool_calls"]
    assert "reasoning_content" not in call_turn
    thoughts = [item for item in result.new_items if item.type == "reasoning_item"]
    assert len(thoughts) == 2  # thinking mode: the call and the answer both thought


def test_context_overflow_in_openai_words(client):
    """Bug 4: litellm (ContextWindowExceededError) and others match OpenAI's sentence."""
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "moon " * 50_000}]
        )
    assert overflow.value.code == "context_length_exceeded"
    assert re.match(
        r"This model's maximum context length is 40960 tokens\. However, your messages resulted "
        r"in \d+ tokens\. Please reduce the length of the messages",
        overflow.value.body["message"],
    )


def test_a_schema_without_additional_properties_closes_its_object(client):
    """Bug 5: a missing additionalProperties is false (as llama.cpp reads it); the model could
    otherwise add keys until max_tokens."""
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8}}}
    reply = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=60,
        extra_body=NO_THINK,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert set(json.loads(reply.choices[0].message.content)) <= {"word"}


def test_models_by_id_and_any_model_name(client, server):
    """Bug 6: GET /v1/models/{id}; bug 7 (decided): any model name is served by the one model,
    and every reply names the model that answered."""
    assert client.models.retrieve("qwen3-tiny-chat").id == "qwen3-tiny-chat"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"
    reply = client.chat.completions.create(
        model="gpt-4o", messages=REVERSE, temperature=0, max_tokens=32, extra_body=NO_THINK
    )
    assert reply.model == "qwen3-tiny-chat" and reply.choices[0].message.content == "river moon"


def test_served_model_id(tmp_path):
    """Bug 6: a local folder is served under its name, never its path; an alias wins."""
    folder = tmp_path / "my-qwen"
    folder.mkdir()
    assert served_model_id(str(folder)) == "my-qwen"
    assert served_model_id(str(folder) + "/") == "my-qwen"
    assert served_model_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert served_model_id(str(folder), "qwen3") == "qwen3"


def test_http_edges_in_the_error_shape(server):
    """A 404 says what was asked; malformed JSON says so without a param; a JSON body sent
    without Content-Type application/json (curl -d) is read."""
    url = server[0]
    missing = httpx.get(url + "/v1/nowhere", headers=HEADERS)
    assert missing.status_code == 404
    assert "GET /v1/nowhere" in missing.json()["error"]["message"]
    broken = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"messages": [',
        headers=HEADERS | {"Content-Type": "application/json"},
    )
    error = broken.json()["error"]
    assert (
        broken.status_code == 400
        and error["param"] is None
        and "not valid JSON" in error["message"]
    )
    body = json.dumps({"messages": REVERSE, "max_tokens": 4}).encode()
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = HEADERS | ({"Content-Type": content_type} if content_type else {})
        answer = httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=60)
        assert answer.status_code == 200, answer.text


def test_think_block_left_in_content(client, server):
    """reasoning_format "none" (llama.cpp's), per request or as --reasoning-field content: the
    content is `<think>\\n…\\n</think>\\n\\n` and the answer, as the template renders it back."""
    split = client.chat.completions.create(
        model="m", messages=REVERSE, temperature=0, max_tokens=64
    )
    reasoning = split.choices[0].message.model_extra["reasoning_content"]
    expected = f"<think>\n{reasoning}\n</think>\n\nriver moon"
    inline = client.chat.completions.create(
        model="m",
        messages=REVERSE,
        temperature=0,
        max_tokens=64,
        extra_body={"reasoning_format": "none"},
    )
    assert inline.choices[0].message.content == expected
    assert "reasoning_content" not in (inline.choices[0].message.model_extra or {})
    state = server[1]
    field, state.reasoning_field = state.reasoning_field, "content"
    try:
        stream = client.chat.completions.create(
            model="m", messages=REVERSE, temperature=0, max_tokens=64, stream=True
        )
        content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        state.reasoning_field = field
    assert content == expected


def test_cors_preflight_and_origin(server):
    """--cors-origin: a preflight is answered without the API key; other origins get no grant."""
    url = server[0] + "/v1/chat/completions"
    asked = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    preflight = httpx.options(url, headers={"Origin": ORIGIN, **asked})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(url, headers={"Origin": "http://elsewhere.example", **asked})
    assert "access-control-allow-origin" not in other.headers
    listed = httpx.get(server[0] + "/v1/models", headers={"Origin": ORIGIN, **HEADERS})
    assert listed.headers["access-control-allow-origin"] == ORIGIN


def test_cors_is_off_by_default():
    """Without --cors-origin no CORS header is ever sent."""
    from fastapi.testclient import TestClient

    from qwen3_mlx.server.app import create_app
    from qwen3_mlx.server.runner import ServeOptions, build_state

    model, tokenizer, generation_config = tiny_model()
    state = build_state(model, tokenizer, generation_config, "m", ServeOptions())
    with TestClient(create_app(state)) as http:
        answer = http.get("/health", headers={"Origin": ORIGIN})
        preflight = http.options(
            "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
        )
    assert "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in preflight.headers


def test_serve_flags_reach_the_server(monkeypatch):
    """`serve` hands --served-model-name, --cors-origin, --kv-bits and --reasoning-field content
    to the server; without an alias a local folder is served under its name."""
    from test_cli import invoke

    import qwen3_mlx.server.runner as runner

    started = []
    monkeypatch.setattr(runner, "serve", lambda state, *where, **options: started.append(state))
    flags = ["--served-model-name", "qwen3", "--cors-origin", ORIGIN, "--kv-bits", "8"]
    flags += ["--reasoning-field", "content"]
    result = invoke("serve", "-m", str(TINY_MODEL), "--port", "0", *flags)  # (a port of its own)
    assert result.exit_code == 0, result.stderr
    assert invoke("serve", "-m", str(TINY_MODEL), "--port", "0").exit_code == 0
    aliased, plain = started
    assert (aliased.model_id, aliased.cors_origins, aliased.reasoning_field) == (
        "qwen3",
        (ORIGIN,),
        "content",
    )
    assert (plain.model_id, plain.cors_origins) == ("qwen3-tiny-chat", ())
    assert (aliased.worker.cache.kv_bits, plain.worker.cache.kv_bits) == (8, None)
