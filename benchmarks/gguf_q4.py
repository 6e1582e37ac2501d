"""A random-weight MLX 4-bit Qwen3 checkpoint re-written as GGUF Q4_0, for llama.cpp.

The same weights: each MLX 4-bit matrix is dequantized to float32 and quantized again to Q4_0
(32-weight blocks, one f16 scale, no bias) with the `gguf` package; norms stay float32. The
tokenizer is written as convert_hf_to_gguf.py writes Qwen's (gpt2 BPE, pre-tokenizer "qwen2"),
so llama.cpp loads the file as a Qwen3 model. Tied embeddings: no `output.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.checkpoints import FIXTURES

# MLX checkpoint key (after model.layers.{i}.) -> GGUF tensor name (after blk.{i}.)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(key: str) -> str:
    """GGUF tensor name for an MLX module path (without .weight/.scales)."""
    if key == "model.embed_tokens":
        return "token_embd"
    if key == "model.norm":
        return "output_norm"
    if key == "lm_head":
        return "output"
    _, _, index, rest = key.split(".", 3)
    return f"blk.{index}.{LAYER_NAMES[rest]}"


def add_tokenizer(writer, vocab_size: int) -> None:
    """Qwen's BPE vocabulary, merges and special ids, as llama.cpp's converter writes them."""
    import gguf

    data = json.loads((FIXTURES / "tokenizer" / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in data["model"]["vocab"].items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = (
            gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        )
    merges = [
        " ".join(pair) if isinstance(pair, list) else pair for pair in data["model"]["merges"]
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(151643)
    writer.add_eos_token_id(151645)
    writer.add_pad_token_id(151643)


def model_writer(path: Path, config: dict, file_type: int):
    """A GGUFWriter for a Qwen3 model of this config, its hyperparameters and tokenizer added."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(file_type)
    add_tokenizer(writer, config["vocab_size"])
    return writer


def export(folder: Path, out: Path) -> Path:
    """Write folder's MLX 4-bit checkpoint to `out` as GGUF Q4_0 (once; kept for later runs)."""
    import gguf

    if out.is_file():
        return out
    config = json.loads((folder / "config.json").read_text())
    group_size = config["quantization"]["group_size"]
    weights = mx.load(str(folder / "model.safetensors"))
    writer = model_writer(out.with_suffix(".partial"), config, gguf.LlamaFileType.MOSTLY_Q4_0)
    for key in sorted(name.rsplit(".", 1)[0] for name in weights if name.endswith(".weight")):
        weight = weights[f"{key}.weight"]
        if f"{key}.scales" in weights:
            dense = mx.dequantize(
                weight, weights[f"{key}.scales"], weights[f"{key}.biases"], group_size, 4
            ).astype(mx.float32)
            array = gguf.quants.quantize(np.array(dense), gguf.GGMLQuantizationType.Q4_0)
            writer.add_tensor(
                f"{gguf_name(key)}.weight", array, raw_dtype=gguf.GGMLQuantizationType.Q4_0
            )
        else:
            writer.add_tensor(f"{gguf_name(key)}.weight", np.array(weight.astype(mx.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.with_suffix(".partial").rename(out)
    return out
