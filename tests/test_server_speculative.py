"""Speculative decoding in the server: a reply that runs alone decodes speculatively and answers
exactly what plain decoding answers, usage and /metrics count the drafted and accepted tokens, and
a speculative row that gets company joins the batch without changing a token.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server_support import API_KEY, running_server, tiny_model

from qwen3_mlx.batching import BatchDecoder, BatchRow
from qwen3_mlx.cache import make_cache
from qwen3_mlx.drafting import NgramLookup
from qwen3_mlx.speculative import Speculation, SpeculativeRow
from qwen3_mlx.tokenizer import IM_END_ID


class WrongDrafter:
    """Drafts token 0 ('!'), which the tiny model never says: drafted, and always rejected."""

    def begin(self, context: list[int]) -> None:
        """Nothing to index."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """count copies of a token that is never right."""
        return [0] * count


COPY = [{"role": "user", "content": "Repeat these words: moon river star lake"}]


@pytest.fixture(scope="module")
def server():
    with running_server(speculation=Speculation(NgramLookup(), 5, "ngram")) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def test_a_reply_alone_is_drafted_and_counted(client, server) -> None:
    reply = client.chat.completions.create(
        model="qwen3-tiny-chat", messages=COPY, temperature=0, max_tokens=64
    )
    assert reply.choices[0].message.content == "moon river star lake"
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    url, _ = server
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    accepted = [
        line for line in metrics.splitlines() if line.startswith("qwen3_mlx_accepted_tokens_total")
    ]
    assert accepted and float(accepted[0].split()[-1]) == details.accepted_prediction_tokens
    assert "qwen3_mlx_drafted_tokens_total" in metrics


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
