"""Time to first token over an 8-turn thinking conversation, three ways.

Random weights never stop on their own, so the replies are scripted: each turn measures the time
to the first token of the reply, then the scripted reply (thinking + answer + <|im_end|>) is run
into the cache as if the model had generated it (untimed).

* ours: qwen3-mlx's Chat mechanism (qwen3_mlx.cache.PromptCache + render_prompt + history_messages):
  the history is re-rendered by the template, which drops earlier turns' thinking, and the cache
  is trimmed to the prefix it shares with the new prompt, so only the last answer and the new
  message are computed.
* stripped: mlx-lm on the same think-stripped prompt with no cache reuse (a full prefill per turn).
* kept: mlx-lm's chat approach (mlx_lm.chat): one growing cache, each turn only the new user
  message is rendered and appended, so earlier thinking stays in the context.
"""

from __future__ import annotations

from typing import Any

from benchmarks.engines import MlxLm, Ours, feed

TURNS = [
    (
        "What is the capital of France?",
        "The user asks for the capital of France. That is Paris, which has been the capital for centuries. I should answer briefly and maybe add one fact.",
        "The capital of France is Paris. It is also the country's largest city.",
    ),
    (
        "And how many people live there?",
        "They mean Paris. The city proper has about 2.1 million inhabitants, while the metropolitan area has over 12 million. I will give both numbers.",
        "About 2.1 million people live in Paris itself, and roughly 12 million in the wider metropolitan area.",
    ),
    (
        "Name three museums I should visit.",
        "Famous museums in Paris: the Louvre, the Musée d'Orsay and the Centre Pompidou. Each is different: old masters, impressionists, modern art.",
        "Try the Louvre for classical art, the Musée d'Orsay for the impressionists, and the Centre Pompidou for modern art.",
    ),
    (
        "Which one is best for a rainy afternoon?",
        "All are indoors. The Orsay is smaller than the Louvre, so it fits an afternoon. The Louvre needs a whole day. I will suggest the Orsay.",
        "The Musée d'Orsay: it is large enough to fill an afternoon but small enough to see without rushing.",
    ),
    (
        "How do I get there from the Eiffel Tower?",
        "From the Eiffel Tower, one can walk along the Seine, about 35 minutes, or take the RER C from Champ de Mars to Musée d'Orsay station, a few stops.",
        "Take the RER C from Champ de Mars–Tour Eiffel to the Musée d'Orsay station, or walk along the Seine in about 35 minutes.",
    ),
    (
        "What does a ticket cost?",
        "Prices change, but a full-price ticket is around 16 euros, and people under 18 enter free. I should note that prices may have changed.",
        "A full-price ticket costs about 16 euros; visitors under 18 get in free. Check the museum's site for current prices.",
    ),
    (
        "Is it open on Mondays?",
        "The Musée d'Orsay closes on Mondays, while the Louvre closes on Tuesdays. So the answer is no, and I can suggest the Louvre on Mondays instead.",
        "No, the Musée d'Orsay is closed on Mondays. The Louvre is open on Mondays (it closes on Tuesdays) if you need an alternative.",
    ),
    (
        "Thanks! Summarise my plan in one sentence.",
        "The plan: a rainy afternoon at the Musée d'Orsay, reached by RER C from the Eiffel Tower, not on a Monday, ticket about 16 euros.",
        "Visit the Musée d'Orsay on a rainy afternoon (not a Monday), taking the RER C from the Eiffel Tower, for about 16 euros.",
    ),
]


def reply_ids(tokenizer: Any, thinking: str, answer: str) -> list[int]:
    """The tokens a thinking reply consists of, as the model would generate them."""
    from qwen3_mlx.tokenizer import IM_END_ID

    return tokenizer.encode(f"<think>\n{thinking}\n</think>\n\n{answer}") + [IM_END_ID]


def run_ours(engine: Ours, turns: int) -> list[dict[str, Any]]:
    """Per turn: TTFT, tokens computed and context length, with the Chat cache-reuse mechanism."""
    from qwen3_mlx.cache import PromptCache
    from qwen3_mlx.engine import render_prompt
    from qwen3_mlx.history import Turn, history_messages

    cache = PromptCache(engine.model)
    history: list[Turn] = []
    results = []
    for user, thinking, answer in TURNS[:turns]:
        messages = history_messages(None, history) + [{"role": "user", "content": user}]
        prompt = render_prompt(engine.tokenizer, messages, thinking=True)
        reused = cache.reuse(prompt)
        ttft = engine.generate(prompt[reused:], cache.cache, 1)[0]
        reply = reply_ids(engine.tokenizer, thinking, answer)
        feed(engine.model, reply, cache.cache)
        cache.settle(prompt + reply)
        history.append(Turn(user, answer, thinking))
        results.append(
            {
                "turn": len(results) + 1,
                "ttft": ttft,
                "computed": len(prompt) - reused,
                "context": len(prompt),
            }
        )
    return results


def run_stripped(
    engine: MlxLm, tokenizer: Any, turns: int, measured: list[int]
) -> list[dict[str, Any]]:
    """mlx-lm, full prefill of the think-stripped history on the turns listed in `measured` (1-based)."""
    from qwen3_mlx.engine import render_prompt
    from qwen3_mlx.history import Turn, history_messages

    history: list[Turn] = []
    results = []
    for number, (user, thinking, answer) in enumerate(TURNS[:turns], start=1):
        messages = history_messages(None, history) + [{"role": "user", "content": user}]
        history.append(Turn(user, answer, thinking))
        if number not in measured:
            continue
        prompt = render_prompt(tokenizer, messages, thinking=True)
        ttft = engine.generate(prompt, engine.new_cache(), 1)[0]
        results.append(
            {"turn": number, "ttft": ttft, "computed": len(prompt), "context": len(prompt)}
        )
    return results


def run_kept(engine: MlxLm, filler: Ours, tokenizer: Any, turns: int) -> list[dict[str, Any]]:
    """mlx-lm's chat approach: each turn appends only the new user message to one growing cache.

    The scripted replies are run into the cache by `filler` (qwen3-mlx on the same weights and
    dtype), which computes the same keys and values much faster on the CPU backend; only mlx-lm's
    own first-token computation is timed.
    """
    cache = engine.new_cache()
    results = []
    for user, thinking, answer in TURNS[:turns]:
        prompt = tokenizer.render([{"role": "user", "content": user}], enable_thinking=True)
        before = cache[0].offset
        ttft = engine.generate(prompt, cache, 1)[0]
        # generate_step ran one step past the first token; drop it, the scripted reply replaces it.
        excess = cache[0].offset - (before + len(prompt))
        for layer in cache:
            layer.trim(excess)
        feed(filler.model, reply_ids(tokenizer, thinking, answer), cache)
        results.append(
            {
                "turn": len(results) + 1,
                "ttft": ttft,
                "computed": len(prompt),
                "context": before + len(prompt),
            }
        )
    return results
