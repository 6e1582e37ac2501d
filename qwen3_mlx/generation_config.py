"""Sampling defaults from a model's generation_config.json."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import ConfigError, Qwen3Error
from qwen3_mlx.settings import PRESET_NAMES, THINKING_DEFAULTS, validate_setting

QWEN3_EOS_IDS = (151645, 151643)


@dataclass(frozen=True)
class GenerationConfig:
    """The model's own sampling defaults (its thinking-mode preset) and stop ids."""

    temperature: float = THINKING_DEFAULTS["temperature"]
    top_p: float = THINKING_DEFAULTS["top_p"]
    top_k: int = THINKING_DEFAULTS["top_k"]
    min_p: float = THINKING_DEFAULTS["min_p"]
    eos_token_ids: tuple[int, ...] = QWEN3_EOS_IDS

    @classmethod
    def from_model_dir(cls, model_dir: Path, config: dict | None = None) -> GenerationConfig:
        """Read generation_config.json; fall back to Qwen3's card values and config's eos."""
        path = Path(model_dir) / "generation_config.json"
        data = read_generation_file(path)
        if "eos_token_id" in data:
            eos_ids = eos_token_ids(data["eos_token_id"], str(path))
        else:
            eos_ids = eos_token_ids((config or {}).get("eos_token_id"), "config.json")
        values = {
            name: _sampling_value(path, name, data[name])
            for name in PRESET_NAMES
            if data.get(name) is not None
        }
        nulls = [name for name in PRESET_NAMES if name in data and data[name] is None]
        if nulls:
            used = ", ".join(f"{name} {THINKING_DEFAULTS[name]:g}" for name in nulls)
            warnings.warn(
                f"{path}: {', '.join(nulls)} {'is' if len(nulls) == 1 else 'are'} null; "
                f"using Qwen3's recommended {used}",
                GenerationConfigWarning,
                stacklevel=2,
            )
        return cls(**values, eos_token_ids=eos_ids)


class GenerationConfigWarning(UserWarning):
    """generation_config.json leaves a sampling value null: Qwen3's recommendation is used."""


def read_generation_file(path: Path) -> dict[str, Any]:
    """The JSON object in generation_config.json; {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (expected a JSON object)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _sampling_value(path: Path, name: str, value: Any) -> Any:
    try:
        return validate_setting(name, value)
    except Qwen3Error as error:
        raise ConfigError(f"{path}: {error}") from None


def eos_token_ids(value: Any, source: str) -> tuple[int, ...]:
    """A stop token id or list of them, checked; Qwen3's own when value is None."""
    if value is None:
        return QWEN3_EOS_IDS
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(
            f"{source}: eos_token_id must be a token id or a list of them, got {value!r}"
        )
    return tuple(ids)
