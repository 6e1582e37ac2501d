"""Build tiny random-weight Qwen3 checkpoint folders, laid out exactly like Hugging Face ones.

Import from tests (`from checkpoints import make_checkpoint`) or use the `make_checkpoint` fixture
in conftest.py. Weights are drawn with numpy from a seed, so a folder is reproducible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"
QWEN3_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 dense model (tokenizer has 151669 ids)

# Which tokenizer_config.json (hence chat template) a folder gets.
TOKENIZER_CONFIGS = {
    "qwen3-4b": FIXTURES / "qwen3-4b" / "tokenizer_config.json",
    "qwen3-4b-original": FIXTURES / "qwen3-4b" / "tokenizer_config.original-2025-04.json",
    "qwen3-4b-thinking-2507": FIXTURES / "qwen3-4b-thinking-2507" / "tokenizer_config.json",
}

# Small but complete: GQA 4/2, explicit head_dim, tied embeddings, the real config's other keys
# (bos/eos ids are added with the real tokenizer; they would be out of range for vocab 512).
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "max_window_layers": 2,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 512,
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """TINY_CONFIG with overrides (any config.json key)."""
    config = json.loads(json.dumps(TINY_CONFIG))
    config.update(overrides)
    return config


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """[out, in] of every Linear in the checkpoint (the modules FP8 and 4-bit quantize)."""
    D, ffn = config["hidden_size"], config["intermediate_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_out, D)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_out, D)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_out, D)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (D, q_out)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (ffn, D)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (ffn, D)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (D, ffn)
    return shapes


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights for a Qwen3 config, scaled so activations stay O(1) and logits spread widely.

    Embedding (and lm_head) entries are N(0, 1), so logits have a std of about sqrt(hidden_size) and
    the top two tokens are usually far apart; Linear weights are N(0, 1/in); norm weights are
    1 + N(0, 0.1^2), so a missing or misplaced norm changes the output.
    """
    rng = np.random.default_rng(seed)
    D, V = config["hidden_size"], config["vocab_size"]
    weights: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((V, D), dtype=np.float32),
        "model.norm.weight": 1 + 0.1 * rng.standard_normal(D, dtype=np.float32),
    }
    for name, (out_features, in_features) in linear_shapes(config).items():
        scale = 1.0 / np.sqrt(in_features)
        weights[name] = scale * rng.standard_normal((out_features, in_features), dtype=np.float32)
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        for norm, size in (
            ("input_layernorm", D),
            ("post_attention_layernorm", D),
            ("self_attn.q_norm", config["head_dim"]),
            ("self_attn.k_norm", config["head_dim"]),
        ):
            weights[f"{prefix}.{norm}.weight"] = 1 + 0.1 * rng.standard_normal(
                size, dtype=np.float32
            )
    if not config.get("tie_word_embeddings", True):
        weights["lm_head.weight"] = rng.standard_normal((V, D), dtype=np.float32)
    return weights


def save_weights(
    model_dir: Path, weights: dict[str, Any], shards: int = 1, dtype: str = "bfloat16"
) -> None:
    """Write safetensors like transformers does: one file, or shards plus model.safetensors.index.json.

    numpy float32 arrays are cast to dtype; mx.arrays are written as they are (FP8, packed 4-bit).
    """
    arrays = {
        name: mx.array(value).astype(getattr(mx, dtype)) if isinstance(value, np.ndarray) else value
        for name, value in weights.items()
    }
    names = sorted(arrays)
    if shards == 1:
        mx.save_safetensors(str(model_dir / "model.safetensors"), arrays, metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: arrays[name] for name in names[index::shards]}
        mx.save_safetensors(str(model_dir / file_name), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total_size = sum(array.nbytes for array in arrays.values())
    index_data = {
        "metadata": {"total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))


def write_config(model_dir: Path, config: dict[str, Any]) -> None:
    """Write config.json."""
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_tokenizer_files(model_dir: Path, variant: str = "qwen3-4b") -> None:
    """Copy the real Qwen3 tokenizer, a tokenizer_config (chat template) and generation_config."""
    if variant not in TOKENIZER_CONFIGS:
        raise ValueError(f"unknown tokenizer variant {variant!r}: {', '.join(TOKENIZER_CONFIGS)}")
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", model_dir / "tokenizer.json")
    shutil.copy(TOKENIZER_DIR / "merges.txt", model_dir / "merges.txt")
    shutil.copy(TOKENIZER_CONFIGS[variant], model_dir / "tokenizer_config.json")
    shutil.copy(
        FIXTURES / "qwen3-4b" / "generation_config.json", model_dir / "generation_config.json"
    )


def make_checkpoint(
    model_dir: Path,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shards: int = 1,
    tokenizer: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Create a random-weight Qwen3 checkpoint folder and return its path.

    dtype: "bfloat16" or "float32" (the stored weights; torch_dtype follows). shards > 1 writes an
    index. tokenizer: None, or a TOKENIZER_CONFIGS key to add the real tokenizer files (vocab_size
    then defaults to Qwen3's 151936 so every token id has an embedding row).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        config_overrides.setdefault("vocab_size", QWEN3_VOCAB_SIZE)
        config_overrides.setdefault("bos_token_id", 151643)
        config_overrides.setdefault("eos_token_id", 151645)
    config = tiny_config(torch_dtype=dtype, **config_overrides)
    write_config(model_dir, config)
    save_weights(model_dir, random_weights(config, seed), shards=shards, dtype=dtype)
    if tokenizer is not None:
        write_tokenizer_files(model_dir, tokenizer)
    return model_dir


def read_safetensors(model_dir: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder (all *.safetensors files), for tests that rewrite one."""
    weights: dict[str, mx.array] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    return weights
