"""Sampling settings (mode presets, explicit overrides, validation), the presence penalty over the
whole reply, mlx-lm's sampler with a seed, and the repetition guard's detector."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_mlx.errors import Qwen3Error, SettingsError
from qwen3_mlx.generate import SamplingStep
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.sampling import (
    FrequencyPenalty,
    PresencePenalty,
    build_logits_processors,
    build_sampler,
    reply_seed,
)
from qwen3_mlx.settings import (
    DEFAULT_MAX_TOKENS,
    SETTING_NAMES,
    Sampling,
    validate_setting,
)
from qwen3_mlx.stream import RepetitionGuard


def test_presets_follow_the_mode() -> None:
    config = GenerationConfig(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
    thinking = Sampling.for_mode(config, True)
    plain = Sampling.for_mode(config, False)
    assert (thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p) == (
        0.6,
        0.95,
        20,
        0.0,
    )
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (
        0.7,
        0.8,
        20,
        0.0,
    )
    assert thinking.max_tokens == plain.max_tokens == DEFAULT_MAX_TOKENS == 32_768
    # The thinking preset is the model's own generation_config, whatever it says.
    assert Sampling.for_mode(GenerationConfig(temperature=0.9, top_k=5), True).temperature == 0.9


def test_explicit_values_hold_in_both_modes() -> None:
    config = GenerationConfig()
    explicit = {"top_p": 0.5}
    assert Sampling.for_mode(config, True, explicit).top_p == 0.5
    assert Sampling.for_mode(config, False, explicit).top_p == 0.5
    assert Sampling.for_mode(config, False, explicit).temperature == 0.7


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("temperature", "0.3", 0.3),
        ("temperature", 0, 0.0),
        ("top_p", 1, 1.0),
        ("top_k", "40", 40),
        ("top_k", 7.0, 7),
        ("min_p", 0.05, 0.05),
        ("presence_penalty", 1.5, 1.5),
        ("max_tokens", "100", 100),
        ("seed", "42", 42),
        ("seed", None, None),
    ],
)
def test_valid_settings_are_converted(name: str, value: object, expected: object) -> None:
    assert validate_setting(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("temperature", -0.1, "temperature must be in [0, 2]"),
        ("temperature", "hot", "temperature must be a number"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("top_p", 0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in"),
        ("top_k", -1, "top_k must be in [0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("min_p", 1.1, "min_p must be in"),
        ("presence_penalty", 3, "presence_penalty must be in [-2, 2]"),
        ("max_tokens", 0, "max_tokens must be in [1"),
        ("seed", -5, "seed must be in [0"),
        ("seed", True, "seed must be an integer"),
        ("seed", 2**63, "seed must be in [0, 2^63)"),
        ("temprature", 1, "unknown setting 'temprature'"),
    ],
)
def test_bad_settings_raise_one_line(name: str, value: object, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        validate_setting(name, value)
    assert isinstance(caught.value, Qwen3Error)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_sampling_record_holds_every_setting_validated() -> None:
    # One field per SETTINGS entry, in its order: a new setting is described once and travels.
    assert tuple(Sampling().as_dict()) == SETTING_NAMES
    record = Sampling(temperature="0.3", top_k=7.0, seed="random")
    assert (record.temperature, record.top_k, record.seed) == (0.3, 7, None)
    with pytest.raises(SettingsError, match=r"frequency_penalty must be in \[-2, 2\]") as caught:
        record.with_values({"frequency_penalty": 3})
    assert caught.value.setting == "frequency_penalty"
    with pytest.raises(SettingsError, match="unknown setting 'temprature'"):
        record.with_values({"temprature": 1})
    with pytest.raises(AttributeError):
        record.temperature = 1.0  # frozen


def test_both_penalties_come_from_the_record() -> None:
    processors = build_logits_processors(Sampling(presence_penalty=0.5, frequency_penalty=0.25))
    assert [type(p) for p in processors] == [PresencePenalty, FrequencyPenalty]
    assert build_logits_processors(Sampling(frequency_penalty=0.0)) == []


def test_plain_greedy_takes_the_logits_own_arg_max() -> None:
    """The token batching and speculative verification pick, even where the log-softmax's
    float32 rounding would tie the top two (then its arg-max was the first of them)."""
    logits = mx.zeros((1, 151_936)).at[0, 1].add(1e-7)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert mx.argmax(logprobs, axis=-1).item() == 0  # the tie the log-softmax makes
    step = SamplingStep()
    assert step(logits).tolist() == [1]
    assert step.previous.tolist() == [1]


def test_a_seeded_reply_owns_its_key_and_leaves_the_global_generator_alone() -> None:
    mx.random.seed(5)
    expected = mx.random.uniform().item()
    mx.random.seed(5)
    sample(BASE, LOGPROBS, 10, seed=reply_seed(99, 0))
    assert mx.random.uniform().item() == expected
    assert reply_seed(None, 3) is None


def test_presence_penalty_covers_the_whole_reply() -> None:
    vocab = 64
    penalty = PresencePenalty(1.5)
    logits = mx.zeros((1, vocab))
    assert mx.array_equal(penalty(None, logits), logits)
    out = penalty(mx.array([3]), logits)
    assert out[0, 3].item() == -1.5 and out[0, 4].item() == 0.0
    # 100 more tokens later (far beyond mlx-lm's 20-token window) token 3 is still penalized ...
    for step in range(100):
        out = penalty(mx.array([10 + step % 40]), logits)
    assert out[0, 3].item() == -1.5
    # ... once, however often it appeared (presence, not frequency).
    for _ in range(5):
        out = penalty(mx.array([3]), logits)
    assert out[0, 3].item() == -1.5
    assert int((np.array(out) < 0).sum()) == 41  # token 3 and the 40 others seen


def test_frequency_penalty_counts_every_occurrence() -> None:
    vocab = 64
    penalty = FrequencyPenalty(0.5)
    logits = mx.zeros((1, vocab))
    assert mx.array_equal(penalty(None, logits), logits)
    for _ in range(3):
        out = penalty(mx.array([3]), logits)
    out = penalty(mx.array([7]), logits)
    assert out[0, 3].item() == -1.5 and out[0, 7].item() == -0.5 and out[0, 4].item() == 0.0


def test_presence_penalty_is_off_by_default() -> None:
    assert build_logits_processors(Sampling(presence_penalty=0.0)) == []
    assert len(build_logits_processors(Sampling(presence_penalty=0.5))) == 1


def sample(settings_: dict, logprobs: mx.array, count: int, seed: int | None = None) -> list[int]:
    step = SamplingStep(build_sampler(Sampling(**settings_)), seed=seed)
    return [int(step(logprobs).item()) for _ in range(count)]


BASE = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
LOGPROBS = mx.log(mx.softmax(mx.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]]), axis=-1))


def test_sampler_uses_the_settings() -> None:
    assert set(sample({**BASE, "temperature": 0.0}, LOGPROBS, 5)) == {0}  # greedy
    assert set(sample({**BASE, "top_k": 1}, LOGPROBS, 20)) == {0}
    assert set(sample({**BASE, "top_k": 2}, LOGPROBS, 60)) == {0, 1}
    assert set(sample({**BASE, "top_p": 0.3}, LOGPROBS, 30)) <= {0, 1}
    assert len(set(sample(BASE, LOGPROBS, 200))) > 4


def test_a_seed_replays_and_each_reply_gets_its_own_stream() -> None:
    first = sample(BASE, LOGPROBS, 30, reply_seed(1234, 0))
    assert sample(BASE, LOGPROBS, 30, reply_seed(1234, 0)) == first
    assert sample(BASE, LOGPROBS, 30, reply_seed(1234, 1)) != first


def detects(guard: RepetitionGuard, tokens: list[int]) -> int | None:
    """The index of the token at which the guard fires, or None."""
    tracker = guard.tracker()
    for index, token in enumerate(tokens):
        if tracker.add(token):
            return index
    return None


def reference_detects(guard: RepetitionGuard, tokens: list[int]) -> int | None:
    """Brute force: the first end where some block of p <= max_block tokens repeats `repeats` times."""
    for end in range(1, len(tokens) + 1):
        for period in range(1, guard.max_block + 1):
            span = max(guard.repeats * period, guard.min_tokens)
            if span > end:
                continue
            tail = tokens[end - span : end]
            if all(tail[i] == tail[i - period] for i in range(period, span)):
                return end - 1
    return None


def test_guard_fires_on_a_loop_at_any_offset() -> None:
    guard = RepetitionGuard(max_block=16, repeats=4, min_tokens=8)
    preamble = [100, 101, 102, 103, 104]
    loop = [7, 8, 9, 10, 11]  # period 5: fires once 4 copies (20 tokens) are in
    assert detects(guard, preamble + loop * 10) == len(preamble) + 20 - 1
    # A single token repeated needs min_tokens of it.
    assert detects(guard, preamble + [5] * 20) == len(preamble) + 8 - 1
    assert detects(guard, list(range(200))) is None


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=60),
    max_block=st.integers(1, 6),
    repeats=st.integers(2, 4),
    min_tokens=st.integers(1, 10),
)
def test_guard_matches_brute_force(
    tokens: list[int], max_block: int, repeats: int, min_tokens: int
) -> None:
    guard = RepetitionGuard(max_block=max_block, repeats=repeats, min_tokens=min_tokens)
    assert detects(guard, tokens) == reference_detects(guard, tokens)


def test_guard_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        RepetitionGuard(repeats=1)


def _hf_order_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' order: temperature, top_k, then top_p on the renormalized candidates."""
    scaled = logits / temperature
    order = np.argsort(-scaled)
    kept = order[:top_k] if top_k else order
    probs = np.exp(scaled[kept] - scaled[kept].max())
    probs /= probs.sum()
    cutoff = (np.cumsum(probs) - probs) < top_p
    out = np.zeros_like(logits)
    out[kept[cutoff]] = probs[cutoff] / probs[cutoff].sum()
    return out


def test_sampler_follows_transformers_order_of_top_k_then_top_p() -> None:
    logits = np.array([3.0, 2.6, 2.2, 1.0, 0.9, 0.8, 0.7, -1.0], dtype=np.float32)
    settings_ = {"temperature": 0.7, "top_k": 4, "top_p": 0.9, "min_p": 0.0}
    expected = _hf_order_probs(logits, 0.7, 4, 0.9)
    batch = mx.broadcast_to(mx.array(logits)[None], (40_000, logits.size))
    mx.random.seed(7)
    sampler = build_sampler(Sampling(**settings_))
    counts = np.bincount(np.array(sampler(batch)), minlength=logits.size)
    observed = counts / counts.sum()
    assert set(np.nonzero(observed)[0]) == set(np.nonzero(expected)[0])
    assert np.abs(observed - expected).max() < 0.015
