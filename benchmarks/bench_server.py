"""Our server beside mlx_lm.server on one checkpoint: agent-loop TTFT, throughput, memory.

    python -m benchmarks.bench_server                          # models/qwen3-tiny-chat
    python -m benchmarks.bench_server --model PATH --steps 6

A benchmark, never a test: nothing here is asserted, and timings on a shared machine are noisy.
One run starts both servers (`qwen3-mlx serve` and `python -m mlx_lm server`) on free loopback
ports, each in its own process group, and kills both at the end, on error and on Ctrl-C too. Then,
against each, with the official `openai` SDK, one server at a time (each throughput run on one,
then the same on the other, so a shared machine's changing load falls on both alike):

1. An agent loop of `--steps` streamed requests with a system prompt and the two tools of
   tiny_model/tiny_data.py. Each step appends the previous assistant message (content, the reasoning
   field the server returned, tool_calls exactly as streamed) and a tool result; when the model
   calls no tool, a fixed call of ours is appended instead, so the history grows the same way on
   both servers. Time to first token is the time to the first content or reasoning delta;
   usage.prompt_tokens_details.cached_tokens is kept when the server reports it.
2. Throughput: generated tokens per second over all streams, with 1, 4 and 8 concurrent streams
   (threads), each a short word task, greedy, the same seed per stream on both servers; the
   median of --repeats runs per level (all runs are in --json).
3. Peak RSS of each server process (and its children), sampled by psutil during its run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from openai import OpenAI

from tiny_model.tiny_data import TOOLS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "qwen3-tiny-chat"
SYSTEM = "You are a helpful assistant."
FIRST_QUESTION = "What is the secret word for moon?"
SECRETS = ("river", "star", "apple", "castle", "dragon", "lamp", "ship", "snow", "tree", "wolf")
KEYS = ("moon", "bear", "lake", "queen", "rocket", "salt", "table", "frog", "duck", "bell")
WORD_TASKS = (
    "Reverse these words: moon river star",
    "Sort these words alphabetically: tree apple lion",
    "Repeat these words: cake door fish",
    "Count the words: bird book bread cloud",
    "Reverse the order: egg frog glass",
    "Sort: wolf snow ship",
    "Copy: rain salt queen",
    "Say these words backwards: lamp key horse",
)
LEVELS = (1, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    model_id: str  # the `model` field the server answers to
    proc: subprocess.Popen | None = None
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, log: Path, timeout: float = 300.0) -> None:
        out = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        threading.Thread(target=self._sample_rss, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {log}")
            for path in ("/health", "/v1/models"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2):
                        return
                except OSError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {log}")

    def _sample_rss(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = root.memory_info().rss
                for child in root.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def servers(model: str, max_tokens: int) -> list[Server]:
    ours, theirs = free_port(), free_port()
    return [
        Server(
            "qwen3-mlx",
            [sys.executable, "-m", "qwen3_mlx", "serve", "--model", model, "--port", str(ours)]
            + ["--max-tokens", str(max_tokens)],
            ours,
            "default",
        ),
        Server(
            "mlx-lm",
            [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(theirs)]
            + ["--max-tokens", str(max_tokens), "--log-level", "WARNING"],
            theirs,
            "default_model",  # mlx_lm.server loads any other name as a Hugging Face repo
        ),
    ]


def fixed_call(step: int) -> dict:
    args = json.dumps({"key": KEYS[step % len(KEYS)]})
    return {
        "id": f"call_fixed_{step}",
        "type": "function",
        "function": {"name": "lookup", "arguments": args},
    }


def streamed_turn(client: OpenAI, model_id: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: TTFT, content, reasoning (under the server's field), tool calls."""
    start = time.perf_counter()
    ttft = None
    content, reasoning, reasoning_key = "", "", None
    calls: dict[int, dict] = {}
    usage = None
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        tools=list(TOOLS.values()),
        temperature=0,
        max_tokens=max_tokens,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        for key in ("reasoning_content", "reasoning"):
            if extra.get(key):
                reasoning_key = reasoning_key or key
                reasoning += extra[key]
                ttft = ttft or time.perf_counter() - start
        if delta.content:
            content += delta.content
            ttft = ttft or time.perf_counter() - start
        for tc in delta.tool_calls or []:
            call = calls.setdefault(
                tc.index,
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = tc.id or call["id"]
            if tc.function is not None:
                call["function"]["name"] += tc.function.name or ""
                call["function"]["arguments"] += tc.function.arguments or ""
            ttft = ttft or time.perf_counter() - start
    cached = None
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - start,
        "content": content,
        "reasoning": reasoning,
        "reasoning_key": reasoning_key,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "cached": cached,
    }


def agent_loop(client: OpenAI, model_id: str, steps: int, max_tokens: int) -> list[dict]:
    messages: list[dict] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": FIRST_QUESTION},
    ]
    rows = []
    for step in range(steps):
        turn = streamed_turn(client, model_id, messages, max_tokens)
        own = not turn["tool_calls"]
        calls = turn["tool_calls"] or [fixed_call(step)]
        assistant: dict[str, Any] = {"role": "assistant", "content": turn["content"]}
        if turn["reasoning_key"]:
            assistant[turn["reasoning_key"]] = turn["reasoning"]
        assistant["tool_calls"] = calls
        messages.append(assistant)
        for i, call in enumerate(calls):
            if not call.get("id"):
                call["id"] = f"call_{step}_{i}"
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": SECRETS[(step + i) % len(SECRETS)],
                }
            )
        rows.append({**turn, "fixed_call": own})
    return rows


def throughput(
    client: OpenAI, model_id: str, streams: int, max_tokens: int
) -> tuple[float, int, float]:
    """Generated tokens per second over `streams` concurrent requests (one each)."""
    tokens = [0] * streams
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            reply = client.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": WORD_TASKS[i % len(WORD_TASKS)]}],
                temperature=0,
                max_tokens=max_tokens,
                seed=1000 + i,
            )
            tokens[i] = reply.usage.completion_tokens
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(tokens) / wall, sum(tokens), wall


def measure(all_servers: list[Server], steps: int, max_tokens: int, repeats: int) -> dict:
    """Every measurement on each server in turn, so a shared machine's changing load falls on
    both alike (an idle server takes no CPU while the other is measured)."""
    clients = {
        s.name: OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=600)
        for s in all_servers
    }
    results: dict[str, dict] = {s.name: {"runs": {n: [] for n in LEVELS}} for s in all_servers}
    for s in all_servers:
        # Warm-up, outside the numbers: a tool request with another system prompt (so the loop's
        # first step shares only a few tokens with it) and a plain one.
        warm = [{"role": "system", "content": "You are a tiny test model."}]
        hi = warm + [{"role": "user", "content": "Hi"}]
        results[s.name]["cold_ttft"] = streamed_turn(clients[s.name], s.model_id, hi, 8)["ttft"]
        throughput(clients[s.name], s.model_id, 1, 8)
    for s in all_servers:
        results[s.name]["loop"] = agent_loop(clients[s.name], s.model_id, steps, max_tokens)
        print(f"{s.name}: agent loop done", flush=True)
    for n in LEVELS:
        for _ in range(repeats):
            for s in all_servers:
                run = throughput(clients[s.name], s.model_id, n, max_tokens)
                results[s.name]["runs"][n].append(run)
        print(f"{n} streams done", flush=True)
    for result in results.values():
        # The median run: on a shared machine the best one is often a lucky lull.
        result["rates"] = {
            n: sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            for n, runs in result["runs"].items()
        }
    return results


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def report(results: dict, servers_: list[Server], steps: int) -> str:
    ours, theirs = results["qwen3-mlx"], results["mlx-lm"]
    lines = [
        "Agent loop, time to first token per step (s); cached/prompt tokens; * = fixed call added",
        "",
        "| step | qwen3-mlx TTFT s | cached/prompt | mlx-lm TTFT s | cached/prompt | mlx-lm/ours |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i in range(steps):
        a, b = ours["loop"][i], theirs["loop"][i]
        lines.append(
            f"| {i + 1} | {a['ttft']:.3f}{'*' if a['fixed_call'] else ''} "
            f"| {fmt(a['cached'], 'd')}/{fmt(a['prompt_tokens'], 'd')} "
            f"| {b['ttft']:.3f}{'*' if b['fixed_call'] else ''} "
            f"| {fmt(b['cached'], 'd')}/{fmt(b['prompt_tokens'], 'd')} "
            f"| {b['ttft'] / a['ttft']:.2f}x |"
        )
    lines += [
        "",
        "Throughput, generated tokens/s over all streams (median of repeats)",
        "",
        "| streams | qwen3-mlx tok/s | x single | mlx-lm tok/s | x single | ours/mlx-lm |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in LEVELS:
        a, b = ours["rates"][n][0], theirs["rates"][n][0]
        a1, b1 = ours["rates"][1][0], theirs["rates"][1][0]
        lines.append(f"| {n} | {a:.1f} | {a / a1:.2f}x | {b:.1f} | {b / b1:.2f}x | {a / b:.2f}x |")
    lines += ["", "| server | peak RSS MiB |", "| --- | ---: |"]
    for s in servers_:
        lines.append(f"| {s.name} | {s.peak_rss / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per level")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--log-dir", default=None, help="server logs [default: a temp folder]")
    args = parser.parse_args(argv)

    import tempfile

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench_server_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    all_servers = servers(args.model, args.max_tokens)
    try:
        for server in all_servers:
            print(f"starting {server.name} on port {server.port} ...", flush=True)
            server.start(log_dir / f"{server.name}.log")
        results = measure(all_servers, args.steps, args.max_tokens, args.repeats)
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for server in all_servers:
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"model {args.model}, max_tokens {args.max_tokens}, logs in {log_dir}\n")
    print(report(results, all_servers, args.steps))
    for name, r in results.items():
        last = r["loop"][-1]
        print(f"\n{name} last step: content {last['content']!r}, tool_calls {last['tool_calls']}")


if __name__ == "__main__":
    main()
