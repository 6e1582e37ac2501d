"""The fused decode layer (qwen3_mlx/cpu/layer.py, native/decode_layer.cpp): a step of one row and
one to eight positions (a decode step, a speculative verify pass) with two native nodes per
decoder layer gives bit for bit the logits and KV cache of the separate ops,
across the cache's growth, on both mat-vec instruction paths, with int8 x (the default) and
float32 x; it writes the cache in place only where no one else holds it; and what it does not
take keeps the separate ops."""

from __future__ import annotations

import io
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx.cache import make_cache
from qwen3_mlx.cpu import layer as cpu_layer
from qwen3_mlx.cpu import native as native_kernel
from qwen3_mlx.loading import load_model

REPO = Path(__file__).resolve().parent.parent
NATIVE = cpu_layer.native_layer()
needs_native = pytest.mark.skipif(
    NATIVE is None, reason=f"fused layer: {native_kernel.checked_reason('decode_rest')}"
)


def separate_ops(monkeypatch) -> None:
    """Decode with the separate ops from here on."""
    monkeypatch.setattr(cpu_layer, "decode_step", lambda *args, **kwargs: None)


def graph_primitives(output: mx.array) -> str:
    """The primitive names of output's graph, as export_to_dot writes them."""
    dot = io.StringIO()
    mx.export_to_dot(dot, output)
    return " ".join(re.findall(r'label ?="([^"]*)"', dot.getvalue()))


def decode(model, steps: int, prompt=(1, 2, 3, 4, 5, 6, 7)) -> tuple[mx.array, list]:
    """Greedy: the logits of `steps` one-token steps after a prompt, and the cache."""
    cache = make_cache(model)
    token = mx.argmax(model(mx.array([prompt]), cache=cache)[:, -1], axis=-1)
    rows = []
    for _ in range(steps):
        logits = model(token[None], cache=cache)[:, -1]
        token = mx.argmax(logits, axis=-1)
        mx.eval(token)
        rows.append(logits)
    return mx.concatenate(rows), cache


def assert_same_decode(model, monkeypatch, steps: int, run=None) -> None:
    """run(model) -> (logits, cache) (default: `steps` one-token steps) gives the same logits and
    caches with the fused nodes and with the separate ops."""
    run = run or (lambda model: decode(model, steps))
    fused_logits, fused_cache = run(model)
    with monkeypatch.context() as patch:
        separate_ops(patch)
        logits, cache = run(model)
    assert mx.array_equal(fused_logits, logits).item()
    for mine, theirs in zip(fused_cache, cache, strict=True):
        assert mine.offset == theirs.offset
        for a, b in zip(mine.state, theirs.state, strict=True):
            assert mx.array_equal(a, b).item()


@needs_native
def test_the_tiny_model_decodes_bit_for_bit_across_the_caches_growth(monkeypatch):
    """300 steps cross mlx-lm's 256-token buffer growth (that step takes the separate ops)."""
    model, _ = load_model(REPO / "models" / "qwen3-tiny-chat-4bit", compute_dtype="float32")
    cache = make_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache), [c.state for c in cache])
    step = model(mx.array([[4]]), cache=cache)
    primitives = graph_primitives(step).split()
    layers = len(model.layers)
    assert primitives.count("Qwen3DecodeQkv") == primitives.count("Qwen3DecodeRest") == layers
    assert primitives.count("SliceUpdate") == 2 * layers  # the cache's keys and values
    assert primitives.count("QuantizedMatvecs") == 1  # the tied head
    assert "DecodeAttention" not in primitives and "Slice" not in primitives
    assert_same_decode(model, monkeypatch, 300)


@needs_native
@pytest.mark.parametrize("isa", [None, "avx2"])
@pytest.mark.parametrize("int8", [False, True])
def test_a_random_model_with_wide_rows_decodes_bit_for_bit(make_checkpoint, monkeypatch, isa, int8):
    """Rows of 256 take the AVX-512 mat-vec (128 weights a step) where the CPU has it; GQA 8/2."""
    if isa:
        monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    monkeypatch.setenv(native_kernel.INT8_ENV, "1" if int8 else "0")
    folder = make_checkpoint(
        hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, num_hidden_layers=3,
    )  # fmt: skip
    model, _ = load_model(folder, quantize_on_load=4, compute_dtype="float32")
    assert_same_decode(model, monkeypatch, 12)


@needs_native
def test_yarn_rope_decodes_bit_for_bit(make_checkpoint, monkeypatch):
    """YaRN's frequencies and attention factor go into the fused node as into the separate ops."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    folder = make_checkpoint(num_hidden_layers=2, rope_scaling=yarn)
    model, _ = load_model(folder, quantize_on_load=4, compute_dtype="float32")
    assert model.layers[0].self_attn.rope.attention_factor != 1.0
    assert_same_decode(model, monkeypatch, 8)


def verify_passes(model, passes: int, width: int) -> tuple[mx.array, list]:
    """The logits of `passes` passes of `width` positions each (as a verify pass feeds them)."""
    cache = make_cache(model)
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    rows = []
    for index in range(passes):
        ids = mx.array([[(7 * index + j) % 500 + 9 for j in range(width)]])
        rows.append(model(ids, cache=cache)[0])
        mx.eval(rows[-1])
    return mx.concatenate(rows), cache


@needs_native
@pytest.mark.parametrize("width", [2, 5, 8])
def test_verify_passes_of_several_positions_are_bit_for_bit(monkeypatch, width):
    model, _ = load_model(REPO / "models" / "qwen3-tiny-chat-4bit", compute_dtype="float32")
    cache = make_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache), [c.state for c in cache])
    primitives = graph_primitives(model(mx.arange(4, 4 + width)[None], cache=cache)).split()
    assert primitives.count("Qwen3DecodeRest") == len(model.layers)
    assert "PrefillAttention" not in primitives and "DecodeAttention" not in primitives
    # 40 passes cross the cache's growth at 256 positions.
    assert_same_decode(model, monkeypatch, 0, lambda model: verify_passes(model, 40, width))


@needs_native
def test_more_positions_than_the_mat_vec_takes_keep_the_separate_ops():
    model, _ = load_model(REPO / "models" / "qwen3-tiny-chat-4bit", compute_dtype="float32")
    cache = make_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache), [c.state for c in cache])
    primitives = graph_primitives(model(mx.arange(4, 13)[None], cache=cache))  # 9 positions
    assert "Qwen3DecodeRest" not in primitives and "DecodeAttention" in primitives


@needs_native
def test_the_cache_is_written_in_place_only_when_no_one_else_holds_it():
    model, _ = load_model(REPO / "models" / "qwen3-tiny-chat-4bit", compute_dtype="float32")
    cache = make_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    mx.eval([c.state for c in cache])

    def address(array: mx.array) -> int:
        return np.asarray(array).__array_interface__["data"][0]

    before = address(cache[0].keys)
    mx.eval(model(mx.array([[4]]), cache=cache))
    assert address(cache[0].keys) == before  # donated: no copy of the cache per token
    offset = cache[0].offset
    held = cache[0].keys[:, :, : offset + 2, :]  # a view over the next token's row: a snapshot
    snapshot = np.array(held)
    logits = model(mx.array([[5]]), cache=cache)
    mx.eval(logits)
    assert np.array_equal(np.array(held), snapshot)  # left untouched: the cache was copied
    assert not np.array_equal(np.array(cache[0].keys[:, :, offset]), snapshot[:, :, offset])
    with_snapshot = np.array(logits)
    cache2 = make_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache2)
    model(mx.array([[4]]), cache=cache2)
    assert np.array_equal(np.array(model(mx.array([[5]]), cache=cache2)), with_snapshot)


@needs_native
def test_what_the_fused_layer_does_not_take_keeps_the_separate_ops():
    model, _ = load_model(REPO / "models" / "qwen3-tiny-chat-4bit", compute_dtype="float32")
    inner = model.model
    h = mx.zeros((1, 1, model.args.hidden_size))
    quantized = make_cache(model, kv_bits=8)
    model(mx.array([[1, 2, 3]]), cache=quantized)
    plain = make_cache(model)
    model(mx.array([[1, 2, 3]]), cache=plain)
    step = cpu_layer.decode_step
    assert step(inner.layers, inner.norm, h, h, quantized) is None  # a quantized cache
    nine = mx.zeros((1, 9, 64))
    assert step(inner.layers, inner.norm, nine, nine, plain) is None  # more than 8 positions
    two_rows = mx.zeros((2, 1, 64))
    assert step(inner.layers, inner.norm, two_rows, two_rows, plain) is None  # two rows
    assert step(inner.layers, inner.norm, h.astype(mx.bfloat16), h, plain) is None
    assert step(inner.layers, inner.norm, h, h, make_cache(model)) is None  # no buffer yet
    bf16, _ = load_model(REPO / "models" / "qwen3-tiny-chat", compute_dtype="float32")
    bf16_cache = make_cache(bf16)
    bf16(mx.array([[1, 2, 3]]), cache=bf16_cache)
    assert step(bf16.model.layers, bf16.model.norm, h, h, bf16_cache) is None  # dense layers
    assert all(c.offset == 3 for c in plain)  # nothing was done


@needs_native
def test_bad_inputs_are_refused_with_a_message():
    model, _ = load_model(REPO / "models" / "qwen3-tiny-chat-4bit", compute_dtype="float32")
    cache = make_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    layer = model.layers[0]
    arrays, group_size = cpu_layer._layer_parts(layer)
    attention = layer.self_attn
    h = mx.zeros((1, 1, model.args.hidden_size))
    q = mx.zeros((1, attention.n_heads, 1, attention.head_dim))
    post = layer.post_attention_layernorm["weight"]
    keys, values = cache[0].keys, cache[0].values

    def rest(**changes):
        args = dict(
            h=h, q=q, keys=keys, values=values, weights=arrays[9:], post_weight=post,
            next_weight=post, offset=3, scale=attention.scale, eps=1e-6, next_eps=1e-6,
            group_size=group_size,
        )  # fmt: skip
        args.update(changes)
        return NATIVE.decode_rest(**args)

    def qkv(**changes):
        args = dict(
            normed=h, weights=arrays[:9], q_weight=attention.q_norm["weight"],
            k_weight=attention.k_norm["weight"], inv_freq=attention.rope.inverse_frequencies(),
            kv_heads=attention.n_kv_heads, offset=3, factor=1.0, eps=1e-6, group_size=group_size,
        )  # fmt: skip
        args.update(changes)
        return NATIVE.decode_qkv(**args)

    with pytest.raises(ValueError, match="the cache has no rows at offset"):
        rest(offset=keys.shape[2])
    with pytest.raises(ValueError, match=r"give \(w, scales, biases\) for o, gate, up and down"):
        rest(weights=arrays[9:-3])
    with pytest.raises(ValueError, match="h must be float32"):
        rest(h=h.astype(mx.bfloat16))
    with pytest.raises(ValueError, match="L from 1 to 8"):
        qkv(normed=mx.zeros((1, 9, model.args.hidden_size)))
    with pytest.raises(ValueError, match="Hq a multiple of the cache's heads"):
        rest(q=mx.zeros((1, 3, 1, attention.head_dim)))
    with pytest.raises(ValueError, match="whole heads"):
        qkv(kv_heads=3)
    with pytest.raises(ValueError, match="group_size must be"):
        qkv(group_size=48)


@needs_native
def test_the_self_test_catches_a_layer_that_differs():
    class Shifted:
        """The extension with RoPE one position off in decode_qkv."""

        def __getattr__(self, name):
            return getattr(NATIVE, name)

        def decode_qkv(self, normed, weights, q_weight, k_weight, inv_freq, heads, offset, *rest):
            return NATIVE.decode_qkv(
                normed, weights, q_weight, k_weight, inv_freq, heads, offset + 1, *rest
            )

    assert cpu_layer._self_test(NATIVE) is None
    assert "differed from the separate ops" in cpu_layer._self_test(Shifted())
