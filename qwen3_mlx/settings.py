"""Sampling settings: one record of every setting, and the mode's preset under the values set explicitly.

`SETTINGS` is the single description of each setting (name, type, range, CLI flags, /set aliases,
label, help). The CLI options, `/set`, transcripts, generation_config.json checks and (later) the
server's request fields all validate through `validate_setting`, so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen3_mlx.errors import SettingsError

if TYPE_CHECKING:  # generation_config validates its values here: no import cycle at run time
    from qwen3_mlx.generation_config import GenerationConfig

DEFAULT_MAX_TOKENS = 32_768
SEED_RANDOM_WORDS = ("none", "off", "random")  # each means "no fixed seed"


class GreedyThinkingWarning(UserWarning):
    """Greedy decoding in thinking mode: Qwen3 warns it can repeat itself endlessly."""


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its type and range, and how each front end names and explains it."""

    name: str  # the API, transcript and server field name
    kind: type  # int or float
    low: float
    high: float | None  # None: no upper bound
    flags: tuple[str, ...]  # CLI flags, the first one shown in help
    label: str  # the short name the REPL shows and /set accepts
    metavar: str
    help: str
    low_open: bool = False  # True: the low bound itself is not allowed
    nullable: bool = False  # True: None (and SEED_RANDOM_WORDS) mean "unset"

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every name /set accepts for this setting."""
        dashed = self.name.replace("_", "-")
        return tuple(dict.fromkeys((self.name, self.label, dashed)))

    @property
    def range_text(self) -> str:
        """The allowed range, like `[0, 2]` or `(0, 1]`."""
        left = "(" if self.low_open else "["
        if self.high is None:
            right = "∞)"
        elif self.high == 2**63 - 1:
            right = "2^63)"
        else:
            right = f"{self.high:g}]"
        return f"{left}{self.low:g}, {right}"

    def validate(self, value: Any) -> Any:
        """The value converted to this setting's type; SettingsError in one line if it is not one."""
        if self.nullable and (value is None or _is_random_word(value)):
            return None
        number = _number(self, value)
        too_low = number <= self.low if self.low_open else number < self.low
        if too_low or (self.high is not None and number > self.high):
            raise SettingsError(f"{self.name} must be in {self.range_text}, got {_shown(value)}")
        return number


def _is_random_word(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in SEED_RANDOM_WORDS


def _shown(value: Any) -> str:
    return value.strip() if isinstance(value, str) else repr(value)


def _number(setting: Setting, value: Any) -> Any:
    expected = "an integer" if setting.kind is int else "a number"
    if isinstance(value, bool) or value is None:
        raise SettingsError(f"{setting.name} must be {expected}, got {_shown(value)}")
    try:
        number = value if isinstance(value, int) else _parse_number(value, setting.kind)
    except (TypeError, ValueError):
        raise SettingsError(f"{setting.name} must be {expected}, got {_shown(value)}") from None
    if not math.isfinite(number):
        raise SettingsError(f"{setting.name} must be a finite number, got {_shown(value)}")
    if setting.kind is int:
        if not float(number).is_integer():
            raise SettingsError(f"{setting.name} must be an integer, got {_shown(value)}")
        return int(number)
    return float(number)


def _parse_number(value: Any, kind: type) -> float | int:
    if kind is int and isinstance(value, str):
        try:
            return int(value.strip())  # exact: a float would round seeds past 2^53
        except ValueError:
            pass
    return float(value)


SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in (
        Setting(
            "temperature", float, 0.0, 2.0, ("--temp", "--temperature"), "temp", "T",
            "Temperature (0 = greedy).",
        ),
        Setting(
            "top_p", float, 0.0, 1.0, ("--top-p",), "top_p", "P", "Nucleus sampling mass.",
            low_open=True,
        ),
        Setting(
            "top_k", int, 0, None, ("--top-k",), "top_k", "K",
            "Keep the k likeliest tokens (0 = all).",
        ),
        Setting(
            "min_p", float, 0.0, 1.0, ("--min-p",), "min_p", "P",
            "Drop tokens below min_p x the top probability.",
        ),
        Setting(
            "presence_penalty", float, -2.0, 2.0, ("--presence-penalty",), "presence_penalty",
            "X", "Penalise tokens already generated (Qwen3: 0 to 2 against repetition).",
        ),
        Setting(
            "max_tokens", int, 1, None, ("--max-tokens",), "max_tokens", "N",
            "Most tokens per reply, thinking included.",
        ),
        Setting(
            "seed", int, 0, 2**63 - 1, ("--seed",), "seed", "N",
            "Random seed, for repeatable replies ('random' for none).", nullable=True,
        ),
    )
}  # fmt: skip
SETTING_NAMES = tuple(SETTINGS)
SETTING_ALIASES = {alias: s.name for s in SETTINGS.values() for alias in s.aliases}


def setting_name(alias: str) -> str:
    """The setting's name for any spelling /set accepts; SettingsError for an unknown one."""
    name = SETTING_ALIASES.get(alias.strip().lower())
    if name is None:
        raise SettingsError(f"unknown setting {alias!r}: use one of {', '.join(SETTING_NAMES)}")
    return name


def validate_setting(name: str, value: Any) -> Any:
    """The value converted to its type, or SettingsError naming the problem in one line."""
    if name not in SETTINGS:
        raise SettingsError(f"unknown setting {name!r}: use one of {', '.join(SETTING_NAMES)}")
    return SETTINGS[name].validate(value)


def validate_overrides(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """A validated copy of a dict of explicit settings."""
    return {name: validate_setting(name, value) for name, value in (values or {}).items()}


def mode_preset(generation_config: GenerationConfig, thinking: bool) -> dict[str, Any]:
    """The preset for a mode: generation_config.json when thinking, Qwen3's card values when not."""
    from qwen3_mlx.generation_config import NON_THINKING_DEFAULTS

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
