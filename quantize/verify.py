"""How far a quantized model's next-token distributions are from its source's, on fixed prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from qwen3_mlx.config import ModelArgs, read_config
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.loading import load_model, resolve_model_path
from qwen3_mlx.tokenizer import load_tokenizer

VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn rain.",
    "Explain in one sentence why the sky is blue.",
    "What is 17 + 25? Answer with the number only.",
)
_RAW_LENGTH = 32  # tokens per prompt when the model has no tokenizer


@dataclass(frozen=True)
class VerifyReport:
    """Mean KL(source || quantized) in nats and top-1 agreement over every prompt position."""

    mean_kl: float
    top1_agreement: float
    positions: int
    prompts: int
    templated: bool  # prompts rendered with the model's chat template (else fixed token ids)


def prompt_token_ids(
    model_dir: Path, vocab_size: int, prompts: tuple[str, ...]
) -> tuple[list[list[int]], bool]:
    """The prompts as chat-template token ids, or fixed pseudo-random ids when there is no tokenizer."""
    try:
        tokenizer = load_tokenizer(model_dir)
        ids = [tokenizer.render([{"role": "user", "content": prompt}]) for prompt in prompts]
        if max(max(i) for i in ids) < vocab_size:
            return ids, True
    except Qwen3Error:
        pass  # no tokenizer or template (a bare checkpoint): fixed ids still compare the two models
    # A fixed linear congruential sequence, so every run (and every machine) sees the same ids.
    fixed = [
        [(7919 * (p + 1) * (i + 3) + 104729 * p) % vocab_size for i in range(_RAW_LENGTH)]
        for p in range(len(prompts))
    ]
    return fixed, False


def _log_probs(model_dir: Path, token_ids: list[list[int]]) -> list[mx.array]:
    """Next-token log-probabilities [L, V] (float32) of each prompt; the model is freed after."""
    model, _ = load_model(model_dir, compute_dtype="auto")
    out = []
    for ids in token_ids:
        logits = model(mx.array([ids]))[0].astype(mx.float32)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(log_probs)
        out.append(log_probs)
    del model
    mx.clear_cache()
    return out


def verify_quantized(
    source: str | Path, quantized: str | Path, prompts: tuple[str, ...] = VERIFY_PROMPTS
) -> VerifyReport:
    """Run the prompts through the source (full precision) and the quantized model; compare."""
    source_dir = resolve_model_path(source)
    quantized_dir = resolve_model_path(quantized)
    vocab_size = ModelArgs.from_dict(read_config(source_dir)).vocab_size
    token_ids, templated = prompt_token_ids(source_dir, vocab_size, prompts)
    # One model in memory at a time: the source's log-probs are small next to its weights.
    reference = _log_probs(source_dir, token_ids)
    candidate = _log_probs(quantized_dir, token_ids)
    kl_sum, agree, positions = 0.0, 0, 0
    for p, q in zip(reference, candidate, strict=True):
        kl_sum += mx.sum(mx.exp(p) * (p - q)).item()
        agree += mx.sum(mx.argmax(p, axis=-1) == mx.argmax(q, axis=-1)).item()
        positions += p.shape[0]
    return VerifyReport(
        mean_kl=kl_sum / positions,
        top1_agreement=agree / positions,
        positions=positions,
        prompts=len(token_ids),
        templated=templated,
    )
