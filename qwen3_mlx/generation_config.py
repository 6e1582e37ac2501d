"""Sampling defaults from a model's generation_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen3_mlx.errors import ConfigError

# The Qwen3 model card's recommendations.
THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
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
        data: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ConfigError(f"{path}: cannot be read as JSON ({error})") from None
        eos = data.get("eos_token_id", (config or {}).get("eos_token_id"))
        eos_ids = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else QWEN3_EOS_IDS
        defaults = cls()
        return cls(
            temperature=float(data.get("temperature", defaults.temperature)),
            top_p=float(data.get("top_p", defaults.top_p)),
            top_k=int(data.get("top_k", defaults.top_k)),
            min_p=float(data.get("min_p", defaults.min_p)),
            eos_token_ids=tuple(int(i) for i in eos_ids),
        )
