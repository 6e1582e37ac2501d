"""Token-level views of tiny_data's conversations: rendering with the real template, training
sequences with their loss spans, and splitting generated ids into thinking, answer and tool calls."""

from __future__ import annotations

import json

from tiny_data import (
    END_THINK_ID,
    END_TOOL_CALL_ID,
    IM_END_ID,
    THINK_ID,
    TOOL_CALL_ID,
    Example,
    call_text,
)


def render_prompt(tokenizer, example: Example) -> list[int]:
    """Token ids of the conversation up to and including the generation prompt."""
    text = tokenizer.apply_chat_template(
        list(example.messages),
        tools=list(example.tools) or None,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=example.enable_thinking,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for one example; the completion ends with <|im_end|>."""
    completion = tokenizer.encode(example.completion(), add_special_tokens=False)
    return render_prompt(tokenizer, example), completion


def training_sequence(tokenizer, example: Example) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of prompt and completion, and the (start, end) spans the loss covers.

    The final reply is one span. In thinking mode the call turn of the unfinished tool loop is
    rendered exactly as it was generated (the template keeps its reasoning_content), so it is a
    second span and one sequence teaches both steps; in the other modes, and when the client sent
    the call turn back without its reasoning, the template renders that turn without a think
    block, so only the final reply is trained.
    """
    prompt, completion = encode_example(tokenizer, example)
    spans = [(len(prompt), len(prompt) + len(completion))]
    call = example.messages[-2] if len(example.messages) >= 2 else {}
    if example.thinks and call.get("tool_calls") and call.get("reasoning_content"):
        before = Example(example.messages[:-2], True, True, example.problem, example.tools)
        start = len(render_prompt(tokenizer, before))
        function = call["tool_calls"][0]["function"]
        text = call_text(function["name"], json.loads(function["arguments"]))
        reply = (
            f"<think>\n{call['reasoning_content']}\n</think>\n\n<tool_call>\n{text}\n</tool_call>"
        )
        ids = tokenizer.encode(reply + "<|im_end|>", add_special_tokens=False)
        if prompt[start : start + len(ids)] != ids:
            raise ValueError("the template re-rendered the call turn differently")
        spans.insert(0, (start, start + len(ids)))
    return prompt + completion, spans


def split_reply(token_ids: list[int]) -> tuple[list[int] | None, list[int]]:
    """Split generated ids into (think-block ids or None when absent, answer ids before the stop)."""
    ids = list(token_ids)
    if IM_END_ID in ids:
        ids = ids[: ids.index(IM_END_ID)]
    if ids[:1] == [THINK_ID] and END_THINK_ID in ids:
        end = ids.index(END_THINK_ID)
        return ids[1:end], ids[end + 1 :]
    return None, ids


def answer_text(tokenizer, reply: list[int]) -> str:
    """The answer of a reply: the text after the think block, before the stop."""
    return tokenizer.decode(split_reply(reply)[1]).strip()


def parse_tool_calls(token_ids: list[int], tokenizer) -> list[tuple[str, dict | None]]:
    """(raw text, parsed JSON or None) of each <tool_call> after the think block of a reply.

    Evaluation only: splits finished ids at 151657/151658. The engine has its own streaming
    parser (qwen3_mlx), which also reports unparsable calls with their error.
    """
    _, ids = split_reply(token_ids)
    calls = []
    while TOOL_CALL_ID in ids:
        ids = ids[ids.index(TOOL_CALL_ID) + 1 :]
        end = ids.index(END_TOOL_CALL_ID) if END_TOOL_CALL_ID in ids else len(ids)
        text = tokenizer.decode(ids[:end]).strip()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        calls.append((text, parsed))
        ids = ids[end + 1 :]
    return calls
