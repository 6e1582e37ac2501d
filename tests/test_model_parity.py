"""Our Qwen3 equals the references on the same weights: transformers (fp32 logits) and mlx-lm
(greedy tokens at bf16 and 4-bit). Run with -s to see the measured differences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import tiny_config

from qwen3_mlx.cache import make_cache
from qwen3_mlx.config import ModelArgs, yarn_scaling
from qwen3_mlx.loading import load_model
from qwen3_mlx.rope import yarn_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FP32_TOLERANCE = 1e-4  # max abs logit difference; measured values are ~1e-5 at logit scale ~50


def hf_model(model_dir: Path, rope_parameters: dict | None = None):
    """transformers' Qwen3ForCausalLM on the same safetensors, fp32, eager attention."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if rope_parameters is not None:
        config.rope_parameters = dict(rope_parameters)
    model = transformers.Qwen3ForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    """Full-sequence logits [B, L, V] from transformers."""
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    """Full-sequence logits [B, L, V] from our model, no cache."""
    return np.array(model(mx.array(ids)).astype(mx.float32))


def random_ids(vocab_size: int, length: int, seed: int = 1) -> np.ndarray:
    """A [1, length] batch of random token ids."""
    return np.random.default_rng(seed).integers(0, vocab_size, (1, length))


def report(case: str, diff: float) -> None:
    """Print a measured difference (visible with pytest -s)."""
    print(f"\n[parity] {case}: max abs diff {diff:.3g}")


@pytest.mark.parametrize(
    ("tied", "heads", "kv_heads", "shards"),
    [
        (True, 4, 2, 1),
        (False, 4, 2, 1),
        (True, 4, 4, 1),
        (False, 8, 2, 3),
        (True, 6, 1, 1),
    ],
    ids=["tied-4/2", "untied-4/2", "tied-4/4", "untied-8/2-sharded", "tied-6/1"],
)
def test_logits_match_transformers(make_checkpoint, tied, heads, kv_heads, shards):
    model_dir = make_checkpoint(
        dtype="float32",
        shards=shards,
        tie_word_embeddings=tied,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    ours, _ = load_model(model_dir, compute_dtype="float32")
    reference = hf_model(model_dir)
    assert reference.config.tie_word_embeddings is tied
    assert hasattr(ours, "lm_head") is not tied
    ids = random_ids(512, 24)
    expected = hf_logits(reference, ids)
    diff = float(np.abs(our_logits(ours, ids) - expected).max())
    report(f"transformers tied={tied} heads={heads}/{kv_heads}", diff)
    assert diff < FP32_TOLERANCE


def test_config_defaults_match_transformers(make_checkpoint):
    """A config.json with only the required keys means what transformers' Qwen3Config means by it
    (head_dim 128, rope_theta 10000, untied lm_head)."""
    model_dir = make_checkpoint(dtype="float32", head_dim=128, tie_word_embeddings=False)
    config = json.loads((model_dir / "config.json").read_text())
    required = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ]
    (model_dir / "config.json").write_text(json.dumps({key: config[key] for key in required}))
    ours, _ = load_model(model_dir, compute_dtype="float32")
    reference = hf_model(model_dir)
    assert ours.args.head_dim == reference.config.head_dim == 128
    ids = random_ids(512, 16)
    diff = float(np.abs(our_logits(ours, ids) - hf_logits(reference, ids)).max())
    report("transformers, config with required keys only", diff)
    assert diff < FP32_TOLERANCE


def test_cached_decode_matches_full_forward(make_checkpoint):
    """Prefill, a multi-token chunk, then token by token through our KV cache equals one full
    transformers forward pass at every position."""
    model_dir = make_checkpoint(dtype="float32", tie_word_embeddings=False)
    ours, _ = load_model(model_dir, compute_dtype="float32")
    ids = random_ids(512, 32, seed=2)
    expected = hf_logits(hf_model(model_dir), ids)[0]
    cache = make_cache(ours)
    pieces = []
    for start, stop in [(0, 12), (12, 17)] + [(i, i + 1) for i in range(17, 32)]:
        logits = ours(mx.array(ids[:, start:stop]), cache=cache)
        pieces.append(np.array(logits[0]))
    assert cache[0].offset == 32
    diff = float(np.abs(np.concatenate(pieces) - expected).max())
    report("cached decode (12 + 5 + 15x1) vs transformers full forward", diff)
    assert diff < FP32_TOLERANCE


YARN_ORIGINAL = 64
YARN_CONFIG = {
    "head_dim": 32,  # 16 frequencies: the YaRN ramp spans frequencies 0..5 with these settings
    "rope_theta": 10000,
    "max_position_embeddings": 4 * YARN_ORIGINAL,
}


def test_yarn_logits_match_transformers_beyond_original_length(make_checkpoint):
    scaling = yarn_scaling(4.0, original_max_position_embeddings=YARN_ORIGINAL)
    model_dir = make_checkpoint(dtype="float32", rope_scaling=scaling, **YARN_CONFIG)
    ours, _ = load_model(model_dir, compute_dtype="float32")
    reference = hf_model(model_dir)
    # transformers 5 moves rope_scaling into rope_parameters; make sure it took YaRN from it.
    assert reference.model.rotary_emb.rope_type == "yarn"
    assert reference.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    ids = random_ids(512, 3 * YARN_ORIGINAL, seed=3)  # positions up to 3x the original context
    diff = float(np.abs(our_logits(ours, ids) - hf_logits(reference, ids)).max())
    report(f"YaRN factor 4, original {YARN_ORIGINAL}, {ids.shape[1]} tokens", diff)
    assert diff < FP32_TOLERANCE


def test_yarn_at_load_time_equals_yarn_in_config(make_checkpoint):
    scaling = yarn_scaling(4.0, original_max_position_embeddings=YARN_ORIGINAL)
    plain_dir = make_checkpoint("plain", dtype="float32", **YARN_CONFIG)
    yarn_dir = make_checkpoint("yarn", dtype="float32", rope_scaling=scaling, **YARN_CONFIG)
    asked, _ = load_model(plain_dir, rope_scaling=scaling, compute_dtype="float32")
    configured, _ = load_model(yarn_dir, compute_dtype="float32")
    plain, _ = load_model(plain_dir, compute_dtype="float32")
    ids = random_ids(512, 3 * YARN_ORIGINAL, seed=4)
    asked_logits = our_logits(asked, ids)
    assert np.array_equal(asked_logits, our_logits(configured, ids))
    # And it is transformers' YaRN, given as transformers 5's rope_parameters.
    reference = hf_model(plain_dir, rope_parameters={**scaling, "rope_theta": 10000.0})
    assert reference.model.rotary_emb.rope_type == "yarn"
    diff = float(np.abs(asked_logits - hf_logits(reference, ids)).max())
    report("YaRN asked at load time vs transformers rope_parameters", diff)
    assert diff < FP32_TOLERANCE
    # YaRN must change the model, or this test would prove nothing.
    assert np.abs(asked_logits - our_logits(plain, ids)).max() > 1e-2


@pytest.mark.parametrize(
    ("head_dim", "theta", "factor", "original", "extra"),
    [
        (128, 1_000_000.0, 4.0, 32_768, {}),  # Qwen's documented YaRN for Qwen3
        (32, 10_000.0, 4.0, 64, {}),
        (64, 10_000.0, 8.0, 512, {"beta_fast": 16, "beta_slow": 2}),
        (64, 10_000.0, 2.0, 512, {"attention_factor": 1.25, "truncate": False}),
        (64, 10_000.0, 4.0, 512, {"mscale": 1.0, "mscale_all_dim": 0.5}),
    ],
)
def test_yarn_frequencies_match_transformers(head_dim, theta, factor, original, extra):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {**yarn_scaling(factor, original), **extra}
    config = transformers.Qwen3Config(
        head_dim=head_dim,
        max_position_embeddings=original * int(factor),
        rope_parameters={**scaling, "rope_theta": theta},
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    periods, our_factor = yarn_frequencies(head_dim, theta, scaling)
    np.testing.assert_allclose(1.0 / np.array(periods), inv_freq.numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(attention_factor)


def test_context_length_with_yarn():
    args = ModelArgs.from_dict(tiny_config(max_position_embeddings=40_960))
    assert args.context_length == 40_960
    assert args.with_rope_scaling(yarn_scaling(4.0)).context_length == 131_072


# --- mlx-lm: same tokens on the same weights --------------------------------------------------

GREEDY_STEPS = 64


def mlx_lm_model(model_dir: Path, bits: int | None = None):
    """mlx-lm's own Qwen3 (mlx_lm.models.qwen3) loaded from the folder, optionally 4-bit quantized."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model

    model, config = mlx_lm_load_model(model_dir)
    assert type(model).__module__ == "mlx_lm.models.qwen3"
    if bits is not None:
        model, _ = quantize_model(model, config, group_size=64, bits=bits)
    return model


def mlx_lm_greedy(model, prompt: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and their log-probabilities from mlx-lm's generate_step."""
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(prompt[0]), model, max_tokens=GREEDY_STEPS, sampler=lambda x: mx.argmax(x, -1)
    )
    tokens, logprobs = [], []
    for token, step_logprobs in steps:
        tokens.append(int(token))
        logprobs.append(np.array(step_logprobs.astype(mx.float32)).reshape(-1))
    return tokens, np.stack(logprobs)


def our_greedy(model, prompt: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and log-probabilities from our model and KV cache, one token per step."""
    cache = make_cache(model)
    inputs = mx.array(prompt)
    tokens, logprobs = [], []
    for _ in range(GREEDY_STEPS):
        # In the model's dtype, as mlx-lm's generate_step does, so equal logits give equal logprobs.
        logits = model(inputs, cache=cache)[:, -1, :]
        step_logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = int(mx.argmax(step_logprobs, axis=-1).item())
        tokens.append(token)
        logprobs.append(np.array(step_logprobs.astype(mx.float32)).reshape(-1))
        inputs = mx.array([[token]])
    return tokens, np.stack(logprobs)


def smallest_margin(logprobs: np.ndarray) -> float:
    """The smallest gap between the best and second-best token over all steps."""
    top2 = np.sort(logprobs, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


# One bf16 ulp at the largest log-probabilities seen (|logprob| in [32, 64)).
BF16_LOGPROB_TOLERANCE = 0.25


@pytest.mark.parametrize(
    ("bits", "tied"),
    [(None, True), (None, False), (4, True), (4, False)],
    ids=["bf16-tied", "bf16-untied", "4bit-tied", "4bit-untied"],
)
def test_greedy_tokens_match_mlx_lm(make_checkpoint, bits, tied):
    """64 greedy steps at bf16 (both compute in bf16) and after 4-bit quantization give the same
    tokens and log-probabilities.

    Measured: the two models compute bit-identical logits (difference 0), which is why the tokens
    agree although bf16 logits tie exactly (top-2 gap 0) at some step of most 64-step runs with
    varied output: with 512 tokens the top-2 gap is below one bf16 ulp about once in ten steps,
    whatever the seed or weight scale. The tied random models repeat one token (the input
    embedding dominates h @ E^T), so the untied cases are the ones with varied output.
    """
    model_dir = make_checkpoint(dtype="bfloat16", tie_word_embeddings=tied)
    ours, _ = load_model(model_dir, quantize_on_load=bits, compute_dtype="checkpoint")
    reference = mlx_lm_model(model_dir, bits)
    if bits is not None:
        assert isinstance(ours.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert isinstance(reference.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    prompt = random_ids(512, 8, seed=5)
    our_tokens, our_logprobs = our_greedy(ours, prompt)
    ref_tokens, ref_logprobs = mlx_lm_greedy(reference, prompt)
    same = next(
        (i for i, (a, b) in enumerate(zip(our_tokens, ref_tokens, strict=True)) if a != b),
        GREEDY_STEPS,
    )
    # Up to and including the first differing step both models saw the same context.
    diff = float(np.abs(our_logprobs[: same + 1] - ref_logprobs[: same + 1]).max())
    name = f"mlx-lm greedy {'bf16' if bits is None else f'{bits}-bit'} tied={tied}"
    report(
        f"{name}: {len(set(ref_tokens))} distinct tokens, smallest top-2 gap "
        f"{smallest_margin(ref_logprobs):.3g}; logprobs",
        diff,
    )
    assert diff <= BF16_LOGPROB_TOLERANCE
    if same < GREEDY_STEPS:
        gap = ref_logprobs[same, ref_tokens[same]] - ref_logprobs[same, our_tokens[same]]
        pytest.fail(
            f"tokens differ from step {same}: mlx-lm's logprob gap between the two choices there "
            f"is {gap:.3g} with a logprob difference of {diff:.3g} (a near-tie if gap <= 2x diff)"
        )
