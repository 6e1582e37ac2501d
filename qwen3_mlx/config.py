"""ModelArgs: the Qwen3 architecture as read from config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import ConfigError

REQUIRED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
# Far above any real model (the largest Qwen3 has 94 layers, a 151,936-token vocabulary), far
# below what would exhaust memory while the (lazy) model is built: a larger value is a typo.
SIZE_LIMITS = {
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "vocab_size": 1 << 24,
    "head_dim": 1024,
    "max_position_embeddings": 1 << 24,
}
# YaRN's factor when one is asked for without a value: Qwen3's model card (32,768 -> 131,072).
YARN_DEFAULT_FACTOR = 4.0


@dataclass(frozen=True)
class ModelArgs:
    """The hyper-parameters a Qwen3 model needs; attribute names follow config.json."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    # Defaults are transformers' Qwen3Config ones, so a config.json that leaves a key out means
    # the same model here as in the reference implementation.
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 32_768
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    model_type: str = "qwen3"

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Validate a config dict; refuse other architectures and name any missing key."""
        model_type = config.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, but qwen3-mlx runs only 'qwen3' models"
            )
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        values = {key: config[key] for key in known if key in config and config[key] is not None}
        # transformers >= 5 nests rope settings under rope_parameters.
        rope_parameters = config.get("rope_parameters") or {}
        if not isinstance(rope_parameters, dict):
            raise ConfigError(
                f"{source}: rope_parameters must be an object, got {rope_parameters!r}"
            )
        if "rope_theta" not in values and "rope_theta" in rope_parameters:
            values["rope_theta"] = rope_parameters["rope_theta"]
        if (
            "rope_scaling" not in values
            and rope_parameters.get("rope_type", "default") != "default"
        ):
            values["rope_scaling"] = dict(rope_parameters)
        max_positions = values.get("max_position_embeddings", cls.max_position_embeddings)
        values["rope_scaling"] = complete_rope_scaling(
            values.get("rope_scaling"), max_positions, source
        )
        check_types(values, source)
        args = cls(**values)
        args.validate(source)
        return args

    def validate(self, source: str = "config.json") -> None:
        """Check each size is a sane positive integer and the shapes fit together (GQA ratio)."""
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
            if value > limit:
                raise ConfigError(
                    f"{source}: {name} is {value:,}, beyond any real model (at most {limit:,})"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )

    def with_rope_scaling(self, rope_scaling: dict[str, Any] | None) -> ModelArgs:
        """A copy with another rope_scaling (YaRN asked for at load time)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["rope_scaling"] = complete_rope_scaling(
            rope_scaling, self.max_position_embeddings, "rope_scaling"
        )
        return ModelArgs(**values)

    @property
    def context_length(self) -> int:
        """Tokens of context the model supports with its current RoPE settings."""
        scaling = self.rope_scaling
        if scaling is not None:
            original = int(scaling["original_max_position_embeddings"])
            return max(int(original * float(scaling["factor"])), self.max_position_embeddings)
        return self.max_position_embeddings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def check_types(values: dict[str, Any], source: str) -> None:
    """Refuse config values of the wrong JSON type, naming the field and what it must be."""
    for name, value in values.items():
        if name in SIZE_LIMITS and not _is_int(value):
            raise ConfigError(
                f"{source}: {name} must be a positive integer, got {value!r} ({_type_name(value)})"
            )
        if name in ("rms_norm_eps", "rope_theta"):
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise ConfigError(
                    f"{source}: {name} must be a number, got {value!r} ({_type_name(value)})"
                )
            if value <= 0 or (name == "rms_norm_eps" and value >= 1):
                bounds = "between 0 and 1" if name == "rms_norm_eps" else "positive"
                raise ConfigError(f"{source}: {name} must be {bounds}, got {value!r}")
        if name == "tie_word_embeddings" and not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")


def _check_yarn(completed: dict[str, Any], source: str) -> None:
    original = completed["original_max_position_embeddings"]
    if not _is_int(original) or not 0 < original <= SIZE_LIMITS["max_position_embeddings"]:
        raise ConfigError(
            f"{source}: rope_scaling original_max_position_embeddings must be a positive "
            f"integer, got {original!r}"
        )
    factor = completed["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"{source}: rope_scaling factor must be a number, got {factor!r}")
    if not math.isfinite(factor) or not 1.0 <= factor <= 1024:
        raise ConfigError(f"{source}: rope_scaling factor must be in [1, 1024], got {factor!r}")


def complete_rope_scaling(
    scaling: dict[str, Any] | None, max_position_embeddings: int, source: str = "config.json"
) -> dict[str, Any] | None:
    """YaRN settings with transformers' defaults filled in; None for plain RoPE; refuse other types."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported (yarn only)")
    completed = {**scaling, "rope_type": "yarn"}
    # As transformers: no original length means max_position_embeddings, no factor their ratio.
    completed.setdefault("original_max_position_embeddings", max_position_embeddings)
    if completed.get("factor") is None and _is_int(completed["original_max_position_embeddings"]):
        completed["factor"] = max_position_embeddings / max(
            completed["original_max_position_embeddings"], 1
        )
    _check_yarn(completed, source)
    return completed


def read_config(model_dir: Path) -> dict[str, Any]:
    """Read config.json from a model folder, with a one-line error naming the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is this a model folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def yarn_scaling(factor: float, original_max_position_embeddings: int = 32_768) -> dict[str, Any]:
    """The rope_scaling block Qwen documents for YaRN."""
    if not factor > 1.0 or not math.isfinite(factor):  # also refuses NaN
        raise ConfigError(f"YaRN factor must be a number greater than 1, got {factor}")
    return {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(original_max_position_embeddings),
    }
