"""One long-context measurement in a fresh process, so its peak memory is its own.

    python -m benchmarks.long_context_worker '<json spec>'    # prints one JSON line

Tasks:
* generation: a long random prompt, then a fixed number of greedy tokens (stop tokens ignored),
  through qwen3-mlx's engine (`start_reply`) or mlx-lm's `stream_generate` with the same kv_bits.
* decode_ab: decode tok/s at a fixed context (caches filled with random keys and values), the KV
  settings alternating burst by burst in one process, so background load hits each alike.
* resume: open a Chat on a saved transcript (with or without its KV cache file) and send one short
  message; time the load and the time to the first token.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

# qwen3_mlx before mlx: on Linux it binds MLX's BLAS calls to OpenBLAS, for both engines alike.
import qwen3_mlx  # noqa: F401
from benchmarks.worker import prompt_ids

KV_GROUP_SIZE = 64


class PeakWatch:
    """Peak MLX memory before and after the first generated token (prefill vs decode)."""

    def __init__(self) -> None:
        import mlx.core as mx

        self.mx = mx
        self.prefill_peak: int | None = None
        mx.reset_peak_memory()

    def first_token(self) -> None:
        """Record the prefill peak once, then measure the decode phase on its own."""
        if self.prefill_peak is None:
            self.prefill_peak = self.mx.get_peak_memory()
            self.mx.reset_peak_memory()

    def report(self) -> dict[str, float]:
        """Peaks in GB: the whole run, the decode phase; active memory and process RSS at the end."""
        decode = self.mx.get_peak_memory()
        return {
            "peak_gb": max(self.prefill_peak or 0, decode) / 1e9,
            "decode_peak_gb": decode / 1e9,
            "active_gb": self.mx.get_active_memory() / 1e9,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        }


def stored_dtype(layer_cache: Any) -> str:
    """The dtype the cache stores keys in (for a quantized cache: its scales and biases)."""
    keys = layer_cache.keys
    return str((keys[1] if isinstance(keys, (tuple, list)) else keys).dtype).removeprefix(
        "mlx.core."
    )


def generate_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine every front end shares: PromptCache + start_reply, greedy, no stop tokens."""
    from qwen3_mlx.cache import PromptCache
    from qwen3_mlx.engine import start_reply
    from qwen3_mlx.loading import load
    from qwen3_mlx.settings import Sampling

    model, tokenizer, generation_config = load(spec["path"])
    prompt = prompt_ids(spec["prompt"])
    settings = Sampling.for_mode(
        generation_config, False, {"temperature": 0.0, "max_tokens": spec["tokens"]}
    )
    watch = PeakWatch()
    cache = PromptCache(model, spec["kv_bits"])
    reply = start_reply(
        model,
        tokenizer,
        cache,
        prompt,
        settings,
        stop_ids=(),
        context_limit=model.args.context_length,
        repetition_guard=None,
    )
    for _ in reply:
        watch.first_token()
    result = reply.result
    return {
        "ttft_s": result.time_to_first_token,
        "decode_tok_s": result.decode_tokens_per_second,
        "generated": result.generated_tokens,
        "kv_dtype": stored_dtype(cache.cache[0]),
        **watch.report(),
    }


def generate_mlx_lm(spec: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's stream_generate with kv_bits, group 64, quantized from the start; EOS ignored."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = load(spec["path"])
    if spec["dtype"] != "checkpoint":
        model.set_dtype(getattr(mx, spec["dtype"]))
        mx.eval(model.parameters())
    tokenizer.eos_token_ids = []  # a fixed number of tokens, like ours
    prompt = mx.array(prompt_ids(spec["prompt"]), dtype=mx.uint32)
    cache = make_prompt_cache(model)
    watch = PeakWatch()
    start = time.perf_counter()
    times = []
    steps = stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=spec["tokens"],
        prompt_cache=cache,
        kv_bits=spec["kv_bits"],
        kv_group_size=KV_GROUP_SIZE,
        quantized_kv_start=0,
    )
    for _ in steps:
        times.append(time.perf_counter() - start)
        watch.first_token()
    return {
        "ttft_s": times[0],
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "generated": len(times),
        "kv_dtype": stored_dtype(cache[0]),
        **watch.report(),
    }


def filled_caches(spec: dict[str, Any], model: Any, dtype: Any) -> dict[Any, list[Any]]:
    """One cache per KV setting, holding spec['context'] tokens of random keys and values.

    Decode speed does not depend on what the keys hold, so no prefill is needed. Ours comes from
    make_cache; mlx-lm's is a KVCache that its generate_step converts (to_quantized), as it would.
    """
    import mlx.core as mx
    from mlx_lm.generate import maybe_quantize_kv_cache

    from qwen3_mlx.cache import make_cache

    args = model.args
    shape = (1, args.num_key_value_heads, 256, args.head_dim)
    caches = {}
    for kv_bits in spec["kv"]:
        if spec["engine"] == "ours":
            cache = make_cache(model, kv_bits)
        else:
            from mlx_lm.models.cache import make_prompt_cache

            cache = make_prompt_cache(model)
        for _ in range(spec["context"] // 256):
            for layer_cache in cache:
                keys = mx.random.normal(shape).astype(dtype)
                layer_cache.update_and_fetch(keys, mx.random.normal(shape).astype(dtype))
            if spec["engine"] != "ours":
                maybe_quantize_kv_cache(cache, 0, KV_GROUP_SIZE, kv_bits)
            mx.eval([layer_cache.state for layer_cache in cache])
        caches[kv_bits] = cache
    return caches


def decode_bursts(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s at a fixed context, KV settings alternating burst by burst in one process.

    Background load then hits every setting alike; each burst starts from the same context (the
    cache is trimmed back after it). Returns every burst's rate per setting.
    """
    import mlx.core as mx

    from qwen3_mlx.cache import trim_cache

    if spec["engine"] == "ours":
        from qwen3_mlx.generate import generate_tokens
        from qwen3_mlx.loading import load

        model = load(spec["path"])[0]

        def steps(token: int, cache: list[Any], kv_bits: Any) -> Any:
            return generate_tokens(model, [token], cache, max_tokens=spec["burst"])
    else:
        from mlx_lm import load
        from mlx_lm.generate import generate_step

        model = load(spec["path"])[0]
        if spec["dtype"] != "checkpoint":
            model.set_dtype(getattr(mx, spec["dtype"]))
            mx.eval(model.parameters())

        def steps(token: int, cache: list[Any], kv_bits: Any) -> Any:
            prompt = mx.array([token], dtype=mx.uint32)
            return generate_step(
                prompt,
                model,
                prompt_cache=cache,
                max_tokens=spec["burst"],
                kv_bits=kv_bits,
                kv_group_size=KV_GROUP_SIZE,
                quantized_kv_start=0,
            )

    caches = filled_caches(spec, model, model.model.norm.weight.dtype)
    rates: dict[str, list[float]] = {str(kv_bits): [] for kv_bits in caches}
    for round_index in range(spec["rounds"] + 1):  # round 0 warms up
        for kv_bits, cache in caches.items():
            start, times = time.perf_counter(), []
            for _ in steps(1000 + round_index, cache, kv_bits):
                times.append(time.perf_counter() - start)
            trim_cache(cache, spec["context"])
            if round_index:
                rates[str(kv_bits)].append((len(times) - 1) / (times[-1] - times[0]))
    return {"rates": rates}


def resume(spec: dict[str, Any]) -> dict[str, Any]:
    """Load a saved transcript into a new Chat, send one short message; time both steps."""
    import warnings

    from qwen3_mlx.chat import Chat

    warnings.simplefilter("ignore")  # greedy thinking warnings: not what is measured
    chat = Chat.from_pretrained(
        spec["path"], kv_bits=spec["kv_bits"], sampling={"temperature": 0.0, "max_tokens": 8}
    )
    start = time.perf_counter()
    note = chat.load(spec["transcript"])
    load_s = time.perf_counter() - start
    reply = chat.send(spec["message"])
    reply.text()
    result = reply.result
    return {
        "note": note,
        "load_s": load_s,
        "ttft_s": result.time_to_first_token,
        "prompt_tokens": result.prompt_tokens,
        "prefilled": result.prefilled_tokens,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The task the spec names."""
    if spec["task"] == "generation":
        return generate_ours(spec) if spec["engine"] == "ours" else generate_mlx_lm(spec)
    if spec["task"] == "decode_ab":
        return decode_bursts(spec)
    if spec["task"] == "resume":
        return resume(spec)
    raise ValueError(f"unknown task {spec['task']!r}")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    spec["path"] = str(Path(spec["path"]))
    print(json.dumps(run(spec)), flush=True)
