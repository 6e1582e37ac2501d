"""Sampling settings: one description of every setting, and the typed record a reply samples with.

`SETTINGS` is the single description of each setting (name, type, range, CLI flags, /set aliases,
label, help). `Sampling` is the frozen record of one reply's values, each validated through it (as
mlx-lm's SamplingArguments). The CLI options, `/set`, transcripts, generation_config.json checks
and the server's request fields all validate here, so they cannot disagree and speak the same words.
The mode presets (Qwen3's card values) live here too. Adding a setting touches this file and the
sampler (sampling.py) only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from qwen3_mlx.errors import SettingsError

DEFAULT_MAX_TOKENS = 32_768
SEED_RANDOM_WORDS = ("none", "off", "random")  # each means "no fixed seed"
# What a thinking mode's preset chooses; the Qwen3 model card's values for each mode.
PRESET_NAMES = ("temperature", "top_p", "top_k", "min_p")
THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


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
    neutral: Any = None  # the value that changes nothing (a summary leaves it out)

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
            raise SettingsError(
                f"{self.name} must be in {self.range_text}, got {_shown(value)}", setting=self.name
            )
        return number


def _is_random_word(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in SEED_RANDOM_WORDS


def _shown(value: Any) -> str:
    return value.strip() if isinstance(value, str) else repr(value)


def _number(setting: Setting, value: Any) -> Any:
    expected = "an integer" if setting.kind is int else "a number"

    def refused(what: str) -> SettingsError:
        return SettingsError(
            f"{setting.name} must be {what}, got {_shown(value)}", setting=setting.name
        )

    if isinstance(value, bool) or value is None:
        raise refused(expected)
    try:
        number = value if isinstance(value, int) else _parse_number(value, setting.kind)
    except (TypeError, ValueError):
        raise refused(expected) from None
    if not math.isfinite(number):
        raise refused("a finite number")
    if setting.kind is int:
        if not float(number).is_integer():
            raise refused("an integer")
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
            neutral=0.0,
        ),
        Setting(
            "frequency_penalty", float, -2.0, 2.0, ("--frequency-penalty",), "frequency_penalty",
            "X", "Penalise each token by how often it was already generated.", neutral=0.0,
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


class SamplingDefaults(Protocol):
    """A model's own thinking-mode preset (a GenerationConfig)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one reply, each validated through SETTINGS when it is made.

    The fields are SETTINGS' names in SETTINGS' order; the defaults are Qwen3's thinking preset.
    """

    temperature: float = THINKING_DEFAULTS["temperature"]
    top_p: float = THINKING_DEFAULTS["top_p"]
    top_k: int = THINKING_DEFAULTS["top_k"]
    min_p: float = THINKING_DEFAULTS["min_p"]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            object.__setattr__(
                self, item.name, validate_setting(item.name, getattr(self, item.name))
            )

    @classmethod
    def for_mode(
        cls, defaults: SamplingDefaults, thinking: bool, explicit: Mapping[str, Any] | None = None
    ) -> Sampling:
        """The mode's preset (the model's generation_config when thinking, Qwen3's card values when
        not) with every explicitly set value on top."""
        if thinking:
            preset = {name: getattr(defaults, name) for name in PRESET_NAMES}
        else:
            preset = dict(NON_THINKING_DEFAULTS)
        return cls(**{**preset, **validate_overrides(explicit)})

    def with_values(self, values: Mapping[str, Any]) -> Sampling:
        """A copy with these values (any SETTINGS names) changed, validated."""
        return replace(self, **validate_overrides(values))

    def as_dict(self) -> dict[str, Any]:
        """Every setting by name (for a transcript or a summary)."""
        return {item.name: getattr(self, item.name) for item in fields(self)}
