"""Speculative decoding in the server: a reply that runs alone decodes speculatively and answers
exactly what plain decoding answers, usage and /metrics count the drafted and accepted tokens, a
request can turn speculation off for itself (`speculative: false`), and a speculative row that
gets company joins the batch without changing a token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import openai
import pytest
from test_server_support import API_KEY, running_server, tiny_model

from qwen3_mlx.batching import BatchDecoder, BatchRow
from qwen3_mlx.cache import make_cache
from qwen3_mlx.drafting import NgramLookup
from qwen3_mlx.speculative import Speculation, SpeculativeRow
from qwen3_mlx.tokenizer import IM_END_ID, IM_START_ID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tiny_model"))
import tiny_data  # noqa: E402


class WrongDrafter:
    """Drafts token 0 ('!'), which the tiny model never says: drafted, and always rejected."""

    def begin(self, context: list[int]) -> None:
        """Nothing to index."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """count copies of a token that is never right."""
        return [0] * count


# The answer after a lookup result restates the reasoning ("The tool says the secret word for
# moon is lake." -> "The secret word for moon is lake."): prompt lookup drafts most of it.
LOOKUP_TOOL = tiny_data.TOOLS["lookup"]
CALL = {"id": "call_1", "type": "function"}
CALL["function"] = {"name": "lookup", "arguments": '{"key": "moon"}'}
ANSWER_AFTER_RESULT = [
    {"role": "user", "content": "What is the secret word for moon?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "The user wants the secret word for moon, so I call lookup.",
        "tool_calls": [CALL],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "lake"},
]


@pytest.fixture(scope="module")
def server():
    lookup = NgramLookup(ends={IM_END_ID}, boundary=IM_START_ID)
    with running_server(speculation=Speculation(lookup, 5, "ngram")) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def counter(url: str, name: str) -> float:
    """A /metrics counter's value."""
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    lines = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    assert lines, name
    return float(lines[0].split()[-1])


def answer(client: openai.OpenAI, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="qwen3-tiny-chat",
        messages=ANSWER_AFTER_RESULT,
        tools=[LOOKUP_TOOL],
        temperature=0,
        max_tokens=64,
        **extra,
    )


def test_a_reply_alone_is_drafted_and_counted(client, server) -> None:
    url, _ = server
    before = counter(url, "qwen3_mlx_accepted_tokens_total")
    reply = answer(client)
    assert reply.choices[0].message.content == "The secret word for moon is lake."
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    after = counter(url, "qwen3_mlx_accepted_tokens_total")
    assert after - before == details.accepted_prediction_tokens


def test_a_request_turns_speculation_off_for_itself(client, server) -> None:
    url, state = server
    drafted = counter(url, "qwen3_mlx_drafted_tokens_total")
    reply = answer(client, extra_body={"speculative": False})
    assert reply.choices[0].message.content == "The secret word for moon is lake."
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == details.rejected_prediction_tokens == 0
    assert counter(url, "qwen3_mlx_drafted_tokens_total") == drafted
    # The other endpoints take the same switch.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "m", "input": "Repeat these words: moon river", "temperature": 0}
    response = httpx.post(
        url + "/v1/responses", json=body | {"speculative": False}, headers=headers
    )
    assert response.status_code == 200
    body = {"model": "m", "max_tokens": 40, "speculative": False}
    body["messages"] = [{"role": "user", "content": "Repeat these words: moon river"}]
    assert httpx.post(url + "/v1/messages", json=body, headers=headers).status_code == 200
    assert counter(url, "qwen3_mlx_drafted_tokens_total") == drafted
    # Asking for it on a server without a drafter is a 400 that says how to get one.
    speculation, state.worker.speculation = state.worker.speculation, None
    try:
        with pytest.raises(openai.BadRequestError, match="--draft-model or --draft ngram"):
            answer(client, extra_body={"speculative": True})
    finally:
        state.worker.speculation = speculation


def _prompt(tokenizer, words: str) -> list[int]:
    messages = [{"role": "user", "content": "Repeat these words: " + words}]
    return tokenizer.encode(tokenizer.render_text(messages, enable_thinking=True))


def test_a_speculative_row_joins_the_batch_when_company_comes() -> None:
    model, tokenizer, _ = tiny_model()
    first, second = _prompt(tokenizer, "moon river star"), _prompt(tokenizer, "apple lake")
    plain = []
    for prompt in (first, second):
        decoder = BatchDecoder(model, {IM_END_ID})
        row = BatchRow(prompt, make_cache(model), max_tokens=40)
        decoder.add(row)
        while not decoder.idle:
            decoder.run_once()
        plain.append([item.token for item in row])

    decoder = BatchDecoder(model, {IM_END_ID})
    speculation = Speculation(WrongDrafter(), 4)
    alone = SpeculativeRow(first, make_cache(model), speculation=speculation, max_tokens=40)
    decoder.add(alone)
    for _ in range(4):  # alone: its rounds run outside the batch
        decoder.run_once()
    assert not decoder.rows and alone.produced > 0
    company = BatchRow(second, make_cache(model), max_tokens=40)
    decoder.add(company)
    while not decoder.idle:
        decoder.run_once()
    assert decoder.widest == 2  # the speculative row joined the batch
    tokens = list(alone)
    assert [item.token for item in tokens] == plain[0]
    assert [item.token for item in company] == plain[1]
    assert sum(item.drafted for item in tokens) > 0
