"""Sampling settings: the mode's preset (thinking or not) under the values a user set explicitly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qwen3_mlx.errors import SettingsError
from qwen3_mlx.generation_config import NON_THINKING_DEFAULTS, GenerationConfig

DEFAULT_MAX_TOKENS = 32_768
SETTING_NAMES = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "max_tokens", "seed")


class GreedyThinkingWarning(UserWarning):
    """Greedy decoding in thinking mode: Qwen3 warns it can repeat itself endlessly."""


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if number != number:  # NaN
        raise SettingsError(f"{name} must be a number, got {value!r}")
    return number


def _ranged(
    kind: type, low: float, high: float | None, low_open: bool = False
) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        number = _number(name, value, kind)
        too_low = number <= low if low_open else number < low
        if too_low or (high is not None and number > high):
            left = "(" if low_open else "["
            right = f"{high}]" if high is not None else "∞)"
            raise SettingsError(f"{name} must be in {left}{low}, {right}, got {value!r}")
        return number

    return check


def _seed(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off", "random")):
        return None
    return _ranged(int, 0, 2**63 - 1)(name, value)


VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "temperature": _ranged(float, 0.0, 2.0),
    "top_p": _ranged(float, 0.0, 1.0, low_open=True),
    "top_k": _ranged(int, 0, None),
    "min_p": _ranged(float, 0.0, 1.0),
    "presence_penalty": _ranged(float, -2.0, 2.0),
    "max_tokens": _ranged(int, 1, None),
    "seed": _seed,
}


def validate_setting(name: str, value: Any) -> Any:
    """The value converted to its type, or SettingsError naming the problem in one line."""
    if name not in VALIDATORS:
        raise SettingsError(f"unknown setting {name!r}: use one of {', '.join(SETTING_NAMES)}")
    return VALIDATORS[name](name, value)


def validate_overrides(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """A validated copy of a dict of explicit settings."""
    return {name: validate_setting(name, value) for name, value in (values or {}).items()}


def mode_preset(generation_config: GenerationConfig, thinking: bool) -> dict[str, Any]:
    """The preset for a mode: generation_config.json when thinking, Qwen3's card values when not."""
    if thinking:
        sampling = {
            "temperature": generation_config.temperature,
            "top_p": generation_config.top_p,
            "top_k": generation_config.top_k,
            "min_p": generation_config.min_p,
        }
    else:
        sampling = dict(NON_THINKING_DEFAULTS)
    return {**sampling, "presence_penalty": 0.0, "max_tokens": DEFAULT_MAX_TOKENS, "seed": None}


def effective_settings(
    generation_config: GenerationConfig, thinking: bool, explicit: Mapping[str, Any]
) -> dict[str, Any]:
    """The mode's preset with every explicitly set value on top."""
    return {**mode_preset(generation_config, thinking), **explicit}
