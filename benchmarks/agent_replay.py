"""Prompt-lookup drafting replayed on agent turns whose replies quote their context.

Under greedy decoding a model's reply is one fixed token sequence, so how often a drafter's
guesses match it depends only on the context and that sequence: replaying a reply through the
drafter and the adaptive draft length gives exactly the drafted, accepted and target-step counts
a target that writes this reply would see. The replies below are scripted (what an agent writes
when it edits a file it has read, rewrites a function with a renamed parameter, or answers from a
tool result), not sampled from a model; the tiny model cannot write them. Each starts with a
line of fresh reasoning, which no lookup can draft.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qwen3_mlx.speculative import replay

SOURCE = '''import time

import httpx


@dataclass
class Fetcher:
    """Downloads pages with retries."""

    base_url: str
    retries: int = 3
    timeout: float = 30.0

    def fetch(self, path: str) -> str:
        """The page at path, retried with backoff."""
        last_error = None
        for attempt in range(self.retries):
            try:
                response = httpx.get(self.base_url + path, timeout=self.timeout)
                response.raise_for_status()
                return response.text
            except httpx.HTTPError as error:
                last_error = error
                time.sleep(2**attempt)
        raise RuntimeError(f"could not fetch {path}: {last_error}")

    def fetch_all(self, paths: list[str]) -> dict[str, str]:
        """Every page, by path."""
        return {path: self.fetch(path) for path in paths}
'''

OLD = SOURCE[SOURCE.index("            try:") : SOURCE.index("        raise RuntimeError")]
NEW = OLD.replace("time.sleep(2**attempt)", "time.sleep(min(2**attempt, 10))")
FUNCTION = SOURCE[SOURCE.index("    def fetch(self") : SOURCE.index("    def fetch_all")]

SEARCH = [
    {
        "title": "Speculative decoding with prompt lookup",
        "url": "https://example.org/notes/prompt-lookup",
        "snippet": "Prompt lookup drafts the tokens that followed an earlier occurrence of the "
        "last few tokens, so replies that quote the input are generated several tokens per step.",
    },
    {
        "title": "Draft models for Qwen3",
        "url": "https://example.org/notes/qwen3-draft-models",
        "snippet": "Qwen3-0.6B shares the tokenizer of the larger Qwen3 models and can draft for them.",
    },
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": "string"} for key in keys},
                "required": list(keys),
            },
        },
    }
    for name, description, keys in (
        ("read_file", "Read a file.", ("path",)),
        (
            "edit_file",
            "Replace old_string by new_string in a file.",
            ("path", "old_string", "new_string"),
        ),
        ("search", "Search the web.", ("query",)),
    )
]


def _call(name: str, arguments: dict[str, str]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _read(path: str, content: str) -> list[dict[str, Any]]:
    """A read_file call and its result, as history."""
    call = {"type": "function", "function": {"name": "read_file", "arguments": {"path": path}}}
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": content},
    ]


def cases() -> dict[str, tuple[list[dict[str, Any]], str]]:
    """Each case's messages (the context) and the reply text the model writes after them."""
    edit = [{"role": "user", "content": "Cap the backoff in fetcher.py at 10 seconds."}]
    edit += _read("fetcher.py", SOURCE)
    rename = [{"role": "user", "content": "Rename the parameter path to url_path in fetch."}]
    rename += _read("fetcher.py", SOURCE)
    search = [{"role": "user", "content": "What does prompt lookup do? Search and quote it."}]
    call = {
        "type": "function",
        "function": {"name": "search", "arguments": {"query": "prompt lookup"}},
    }
    search += [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": json.dumps(SEARCH, indent=2)},
    ]
    quote = SEARCH[0]
    return {
        "edit call": (
            edit,
            "<think>\nThe sleep grows without bound; wrap it in min(..., 10).\n</think>\n\n"
            + _call("edit_file", {"path": "fetcher.py", "old_string": OLD, "new_string": NEW}),
        ),
        "rewrite": (
            rename,
            "<think>\nRename the parameter and its three uses.\n</think>\n\nHere is fetch with "
            "the parameter renamed:\n\n```python\n" + FUNCTION.replace("path", "url_path") + "```",
        ),
        "quote result": (
            search,
            "<think>\nThe first result answers it; quote its snippet.\n</think>\n\n"
            f'According to "{quote["title"]}" ({quote["url"]}): "{quote["snippet"]}"',
        ),
    }


def print_replays(
    tokenizer: Any, drafters: dict[str, Callable[[], Any]], verify: dict[int, float] | None
) -> None:
    """One line per case and drafter: acceptance, tokens per target step, and (with the 4B verify
    costs) the projected speed against plain decoding."""
    from benchmarks.bench_speculative import share

    print("Agent turns replayed (scripted replies that quote their context; greedy):", flush=True)
    step = (lambda rows: verify[rows] / verify[1]) if verify else (lambda rows: 1.0)
    for case, (messages, reply) in cases().items():
        prompt = tokenizer.encode(
            tokenizer.render_text(messages, tools=TOOLS, enable_thinking=True)
        )
        reply_ids = tokenizer.encode(reply + "<|im_end|>")
        for name, make in drafters.items():
            run = replay(make(), prompt, reply_ids, int(name.rsplit("=", 1)[1]), step)
            speed = f"  {run.tokens / run.cost:4.2f}x plain (projected 4B)" if verify else ""
            print(
                f"  {case:<13} {name:<15} accepted {run.accepted:4d}/{run.drafted:<4d} "
                f"{share(run.accepted, run.drafted)}  {run.tokens / run.steps:4.2f} tokens/step{speed}",
                flush=True,
            )
