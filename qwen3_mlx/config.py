"""ModelArgs: the Qwen3 architecture as read from config.json."""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class ModelArgs:
    """The hyper-parameters a Qwen3 model needs; attribute names follow config.json."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40_960
    tie_word_embeddings: bool = True
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
        if "rope_theta" not in values and "rope_theta" in rope_parameters:
            values["rope_theta"] = rope_parameters["rope_theta"]
        if "rope_scaling" not in values and rope_parameters.get("rope_type", "default") != "default":
            values["rope_scaling"] = dict(rope_parameters)
        values.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        args = cls(**values)
        args.validate(source)
        return args

    def validate(self, source: str = "config.json") -> None:
        """Check the shapes fit together (GQA ratio, positive sizes)."""
        for name in REQUIRED_KEYS + ("head_dim",):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )

    def with_rope_scaling(self, rope_scaling: dict[str, Any] | None) -> ModelArgs:
        """A copy with another rope_scaling (YaRN asked for at load time)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["rope_scaling"] = rope_scaling
        return ModelArgs(**values)

    @property
    def context_length(self) -> int:
        """Tokens of context the model supports with its current RoPE settings."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "yarn":
            original = int(scaling.get("original_max_position_embeddings", 32_768))
            return max(int(original * float(scaling.get("factor", 1.0))), self.max_position_embeddings)
        return self.max_position_embeddings


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
    if factor <= 1.0:
        raise ConfigError(f"YaRN factor must be greater than 1, got {factor}")
    return {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(original_max_position_embeddings),
    }
