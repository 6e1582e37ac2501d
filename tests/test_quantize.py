"""The `quantize` converter: round trips with mlx-lm, the mlx-community layout, mixed_4_6, FP8
sources, refusals, atomicity on failure, and the CLI command's exit codes."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from checkpoints import FIXTURES, read_safetensors, save_weights, write_config
from typer.testing import CliRunner

import qwen3_mlx.quantize.convert as convert_module
import qwen3_mlx.quantize.tensor_io as tensor_io
from qwen3_mlx.config import ModelArgs
from qwen3_mlx.errors import CheckpointError, ConfigError, ModelNotFoundError, QuantizationError
from qwen3_mlx.loading import load_model
from qwen3_mlx.quant import QuantSpec
from qwen3_mlx.quantize import ConversionError, quantize_checkpoint, verify_quantized
from qwen3_mlx.quantize.plan import target_tensors

REAL_4B = FIXTURES / "mlx-community-Qwen3-4B-4bit"
IDS = mx.array([[1, 5, 9, 42, 7, 300, 11, 2]])
MakeCheckpoint = Callable[..., Path]


def our_logits(folder: Path) -> mx.array:
    model, _ = load_model(folder, compute_dtype="checkpoint")
    return model(IDS)


def mlx_lm_logits(folder: Path) -> mx.array:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(folder)
    return model(IDS)


def leftovers(parent: Path) -> list[str]:
    """Hidden staging (or moved-aside) folders the converter left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


# Round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size,source_dtype,tied",
    [(4, 64, "bfloat16", True), (6, 128, "float32", False)],
    ids=["4bit-g64-bf16-tied", "6bit-g128-fp32-untied"],
)
def test_round_trip_equals_mlx_lm(
    make_checkpoint: MakeCheckpoint,
    tmp_path: Path,
    bits: int,
    group_size: int,
    source_dtype: str,
    tied: bool,
) -> None:
    from mlx_lm import convert

    source = make_checkpoint("src", dtype=source_dtype, tie_word_embeddings=tied)
    ours = tmp_path / "ours"
    quantize_checkpoint(source, ours, spec=QuantSpec(bits=bits, group_size=group_size))
    # mlx-lm reads our folder, and our loader reads it, to the same logits.
    assert mx.array_equal(mlx_lm_logits(ours), our_logits(ours)).item()
    reference = tmp_path / "reference"
    # Same dtype on both sides: mlx_lm.convert casts to it before quantizing, as we do.
    convert(
        hf_path=str(source),
        mlx_path=str(reference),
        quantize=True,
        q_group_size=group_size,
        q_bits=bits,
        dtype="bfloat16",
    )
    assert mx.array_equal(our_logits(reference), our_logits(ours)).item()
    mine, theirs = read_safetensors(ours), read_safetensors(reference)
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        assert (
            mine[name].dtype == theirs[name].dtype
            and mx.array_equal(mine[name], theirs[name]).item()
        ), name
    # With group 128 the 64-wide projections cannot be grouped and stay bf16, as in mlx-lm.
    assert ("model.layers.0.self_attn.q_proj.scales" in mine) == (group_size == 64)
    assert ("lm_head.weight" in mine) == (not tied)
    config = json.loads((ours / "config.json").read_text())
    assert (
        config["quantization"]
        == config["quantization_config"]
        == {"group_size": group_size, "bits": bits}
    )


def test_chunked_conversion_equals_whole_tensors(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_checkpoint("src")
    quantize_checkpoint(source, tmp_path / "whole")
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 1000)  # 7 rows of the 64-wide bf16 tensors
    quantize_checkpoint(source, tmp_path / "chunked")
    whole, chunked = read_safetensors(tmp_path / "whole"), read_safetensors(tmp_path / "chunked")
    assert all(mx.array_equal(whole[name], chunked[name]).item() for name in whole)


# Layout -----------------------------------------------------------------------------------------


def test_tiny_checkpoint_with_4b_naming_has_the_real_index_names(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    real_config = json.loads((FIXTURES / "qwen3-4b" / "config.json").read_text())
    del real_config["torch_dtype"]  # make_checkpoint sets it from its dtype (bfloat16)
    small = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
    }
    source = make_checkpoint("src", **{**real_config, **small})
    result = quantize_checkpoint(source, tmp_path / "out")
    names = set(index_of(result.output)["weight_map"])
    real_names = set(index_of(REAL_4B)["weight_map"])
    assert len(real_names) == 904 and names == real_names
    weights = read_safetensors(result.output)
    for name in names:
        if name.endswith(("norm.weight",)):
            assert weights[name].dtype == mx.bfloat16 and weights[name].ndim == 1
        elif name.endswith(".weight"):
            module = name[: -len(".weight")]
            assert weights[name].dtype == mx.uint32
            in_features = weights[name].shape[1] * 32 // 4
            assert weights[f"{module}.scales"].shape == (weights[name].shape[0], in_features // 64)
            assert weights[f"{module}.biases"].dtype == mx.bfloat16
    # Every key of the real mlx-community config.json, with the source's values kept.
    config = json.loads((result.output / "config.json").read_text())
    real_mlx_config = json.loads((REAL_4B / "config.json").read_text())
    assert set(config) == set(real_mlx_config)
    assert {k: v for k, v in config.items() if k not in small} == {
        k: v for k, v in real_mlx_config.items() if k not in small
    }


def test_4b_names_shapes_and_size_equal_the_real_index() -> None:
    config = json.loads((FIXTURES / "qwen3-4b" / "config.json").read_text())
    _, outputs, block = target_tensors(ModelArgs.from_dict(config), QuantSpec(), mx.bfloat16)
    real = index_of(REAL_4B)
    assert set(outputs) == set(real["weight_map"])
    assert (
        sum(t.nbytes for t in outputs.values()) == real["metadata"]["total_size"] == 2_262_920_192
    )
    assert block == {"group_size": 64, "bits": 4}
    expected = {
        "model.embed_tokens.weight": ("U32", (151936, 320)),
        "model.embed_tokens.scales": ("BF16", (151936, 40)),
        "model.layers.0.self_attn.q_proj.weight": ("U32", (4096, 320)),
        "model.layers.0.self_attn.k_proj.biases": ("BF16", (1024, 40)),
        "model.layers.0.self_attn.o_proj.weight": ("U32", (2560, 512)),
        "model.layers.35.mlp.down_proj.weight": ("U32", (2560, 1216)),
        "model.layers.35.mlp.down_proj.scales": ("BF16", (2560, 152)),
        "model.layers.0.self_attn.q_norm.weight": ("BF16", (128,)),
        "model.norm.weight": ("BF16", (2560,)),
    }
    assert {name: (outputs[name].dtype, outputs[name].shape) for name in expected} == expected


def test_tied_source_with_an_lm_head_writes_none(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    weights = read_safetensors(source)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # some tied exports keep it
    save_weights(source, weights)
    result = quantize_checkpoint(source, tmp_path / "out")
    assert not any(name.startswith("lm_head") for name in index_of(result.output)["weight_map"])
    assert mx.array_equal(mlx_lm_logits(result.output), our_logits(result.output)).item()


def test_small_shard_size_writes_a_valid_sharded_index(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src", shards=2)
    single = quantize_checkpoint(source, tmp_path / "single")
    sharded = quantize_checkpoint(source, tmp_path / "sharded", max_shard_size="20kB")
    index = index_of(sharded.output)
    files = sorted(set(index["weight_map"].values()))
    assert sharded.shards == len(files) > 2
    assert files == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    assert index["metadata"]["total_size"] == single.output_bytes
    assert not (sharded.output / "model.safetensors").exists()
    for name in files:  # each shard is within the limit unless one module alone is bigger
        tensors = mx.load(str(sharded.output / name))
        assert len(tensors) == 3 or sum(t.nbytes for t in tensors.values()) <= 20_000
    assert mx.array_equal(our_logits(sharded.output), our_logits(single.output)).item()
    assert mx.array_equal(mlx_lm_logits(sharded.output), our_logits(single.output)).item()


def test_side_files_model_card_and_dtype(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint("src", tokenizer="qwen3-4b")
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "LICENSE").write_text("Apache License 2.0")
    (source / "modeling_evil.py").write_text("raise SystemExit")
    (source / "README.md").write_text("the source's own card")
    result = quantize_checkpoint(
        source, tmp_path / "out", dtype="float16", spec=QuantSpec(bits=8, group_size=32)
    )
    names = {p.name for p in result.output.iterdir()}
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "merges.txt",
        "generation_config.json",
        "chat_template.jinja",
        "LICENSE",
        "README.md",
    } <= names
    assert "modeling_evil.py" not in names
    card = (result.output / "README.md").read_text()
    assert str(source) in card and "| bits | 8 |" in card and "| group size | 32 |" in card
    assert "| recipe | uniform |" in card and "qwen3-mlx 0.1.0" in card
    config = json.loads((result.output / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    weights = read_safetensors(result.output)
    assert weights["model.norm.weight"].dtype == mx.float16
    assert weights["model.embed_tokens.scales"].dtype == mx.float16
    assert result.bits_per_weight == pytest.approx(8 * result.output_bytes / result.parameters)
    model, _ = load_model(result.output, compute_dtype="checkpoint")
    assert model.model.embed_tokens.bits == 8 and model.model.embed_tokens.group_size == 32


def test_progress_reports_every_tensor_and_byte(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    events = []
    result = quantize_checkpoint(make_checkpoint("src"), tmp_path / "out", progress=events.append)
    done = [(e.tensors_done, e.bytes_done) for e in events]
    assert done == sorted(done)
    last = events[-1]
    assert last.tensors_done == last.tensors_total == 2 * 11 + 2  # per layer 7 linears + 4 norms
    assert last.bytes_done == last.bytes_total == result.source_bytes


# mixed_4_6 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mixed_4_6_overrides_load_in_mlx_lm_and_here(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, tied: bool
) -> None:
    source = make_checkpoint("src", num_hidden_layers=8, tie_word_embeddings=tied)
    result = quantize_checkpoint(source, tmp_path / "out", spec=QuantSpec(recipe="mixed_4_6"))
    six = {"group_size": 64, "bits": 6}
    output_embedding = "model.embed_tokens" if tied else "lm_head"
    expected = {"group_size": 64, "bits": 4, output_embedding: six}
    for layer in (0, 7):  # the first and last eighth of 8 layers
        expected[f"model.layers.{layer}.self_attn.v_proj"] = six
        expected[f"model.layers.{layer}.mlp.down_proj"] = six
    config = json.loads((result.output / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == expected
    model, _ = load_model(result.output, compute_dtype="checkpoint")
    bits = {path: m.bits for path, m in model.named_modules() if hasattr(m, "bits")}
    assert {path for path, b in bits.items() if b == 6} == set(expected) - {"group_size", "bits"}
    assert set(bits.values()) == {4, 6}
    assert mx.array_equal(mlx_lm_logits(result.output), model(IDS)).item()


# FP8 --------------------------------------------------------------------------------------------

FP8_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def fp8_blocks(weight: mx.array, block: int = 128) -> tuple[mx.array, mx.array]:
    """Qwen's scheme: per 128x128 block, scale = max|w| / 448 (bf16), w_fp8 = e4m3(w / scale)."""
    w = weight.astype(mx.float32)
    rows, cols = w.shape
    R, C = -(-rows // block), -(-cols // block)
    padded = mx.pad(w, [(0, R * block - rows), (0, C * block - cols)])
    blocks = padded.reshape(R, block, C, block)  # [R, block, C, block]
    scale = (mx.abs(blocks).max(axis=(1, 3)) / 448.0).astype(mx.bfloat16)
    scaled = blocks / scale.astype(mx.float32)[:, None, :, None]
    return mx.to_fp8(scaled.reshape(R * block, C * block)[:rows, :cols]), scale


def retag_as_f8_e4m3(path: Path) -> None:
    """mx.save_safetensors writes FP8 bytes as U8; real Qwen files say F8_E4M3."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == "U8":
            info["dtype"] = "F8_E4M3"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def make_fp8_checkpoint(bf16_source: Path, folder: Path) -> Path:
    """The FP8 version of a bf16 checkpoint: every Linear in blocks, everything else as it was."""
    folder.mkdir()
    config = json.loads((bf16_source / "config.json").read_text())
    write_config(folder, {**config, "quantization_config": FP8_QUANTIZATION_CONFIG})
    weights = read_safetensors(bf16_source)
    for name in [n for n in weights if "_proj." in n]:
        weights[name], weights[name + "_scale_inv"] = fp8_blocks(weights[name])
    save_weights(folder, weights, shards=2)
    for path in folder.glob("*.safetensors"):
        retag_as_f8_e4m3(path)
    return folder


def test_fp8_source_matches_bf16_conversion_within_quantization_error(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_checkpoint("src", **FP8_CONFIG)
    fp8_source = make_fp8_checkpoint(source, tmp_path / "fp8")
    from_bf16 = quantize_checkpoint(source, tmp_path / "from-bf16").output
    from_fp8 = quantize_checkpoint(fp8_source, tmp_path / "from-fp8").output
    config = json.loads((from_fp8 / "config.json").read_text())
    assert config["quantization_config"] == config["quantization"] == {"group_size": 64, "bits": 4}
    original, a, b = (
        read_safetensors(source),
        read_safetensors(from_bf16),
        read_safetensors(from_fp8),
    )
    assert set(a) == set(b)
    for name in [n for n in original if "_proj." in n]:
        module = name[: -len(".weight")]
        w = original[name].astype(mx.float32)
        deq_a = mx.dequantize(a[name], a[f"{module}.scales"], a[f"{module}.biases"], 64, 4)
        deq_b = mx.dequantize(b[name], b[f"{module}.scales"], b[f"{module}.biases"], 64, 4)
        step_a = mx.repeat(mx.abs(a[f"{module}.scales"].astype(mx.float32)), 64, axis=1)
        step_b = mx.repeat(mx.abs(b[f"{module}.scales"].astype(mx.float32)), 64, axis=1)
        # Each 4-bit rounding is at most half a step (x1.25 for bf16 scale/bias rounding) and e4m3
        # keeps 3 mantissa bits: |w_fp8 - w| <= |w|/16 (+ 1/128 for the bf16 block scale).
        bound = 0.625 * (step_a + step_b) + mx.abs(w) * (1 / 16 + 1 / 128) + 1e-6
        assert mx.all(
            mx.abs(deq_a.astype(mx.float32) - deq_b.astype(mx.float32)) <= bound
        ).item(), name
    assert mx.array_equal(a["model.norm.weight"], b["model.norm.weight"]).item()
    assert mx.array_equal(mlx_lm_logits(from_fp8), our_logits(from_fp8)).item()
    # Block rows at a time (two 128-row chunks per weight) gives the same bytes as whole tensors.
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 128 * 256)
    chunked = read_safetensors(quantize_checkpoint(fp8_source, tmp_path / "chunked").output)
    assert all(mx.array_equal(b[name], chunked[name]).item() for name in b)


# Refusals ---------------------------------------------------------------------------------------


def test_refuses_an_already_quantized_source(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    quantized = quantize_checkpoint(make_checkpoint("src"), tmp_path / "q4").output
    with pytest.raises(QuantizationError, match="already quantized .MLX 4-bit"):
        quantize_checkpoint(quantized, tmp_path / "again")
    gptq = make_checkpoint("gptq", quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(QuantizationError, match="already quantized .gptq"):
        quantize_checkpoint(gptq, tmp_path / "out")
    assert not (tmp_path / "again").exists() and not (tmp_path / "out").exists()


def test_refuses_other_architectures_and_missing_sources(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        quantize_checkpoint(make_checkpoint("llama", model_type="llama"), tmp_path / "out")
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(QuantizationError, match="unsupported bits 7"):
        QuantSpec(bits=7)
    with pytest.raises(QuantizationError, match="unsupported group size 16"):
        QuantSpec(group_size=16)
    with pytest.raises(QuantizationError, match="unknown recipe 'mixed_2_6'"):
        QuantSpec(recipe="mixed_2_6")
    with pytest.raises(ConversionError, match="bad shard size"):
        quantize_checkpoint("unused", "unused", max_shard_size="5 parsecs")


def test_refuses_a_bad_dtype(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="unknown dtype 'int8'"):
        quantize_checkpoint(make_checkpoint("src"), tmp_path / "out", dtype="int8")


def test_existing_output_needs_force_and_force_replaces_it(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    output = make_checkpoint("out")  # an older model folder, with a note beside it
    (output / "old.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists .use --force"):
        quantize_checkpoint(source, output)
    assert (output / "old.txt").read_text() == "keep me"
    quantize_checkpoint(source, output, force=True)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    with pytest.raises(ConversionError, match="must not be the source"):
        quantize_checkpoint(source, source, force=True)
    with pytest.raises(ConversionError, match="must not be the source"):
        quantize_checkpoint(source, tmp_path, force=True)
    assert (source / "model.safetensors").is_file()


def test_bad_source_tensors_are_refused(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint("src")
    weights = read_safetensors(source)
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][
        :, :32
    ]
    save_weights(source, weights)
    with pytest.raises(
        CheckpointError, match=r"up_proj.weight has shape \(128, 32\), expected \(128, 64\)"
    ):
        quantize_checkpoint(source, tmp_path / "out")
    truncated = make_checkpoint("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        quantize_checkpoint(truncated, tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


# Atomicity --------------------------------------------------------------------------------------


def test_nan_tensor_part_way_leaves_nothing(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    weights = read_safetensors(source)
    bad = weights["model.layers.1.self_attn.o_proj.weight"]
    weights["model.layers.1.self_attn.o_proj.weight"] = mx.where(
        mx.arange(bad.size).reshape(bad.shape) == 100, mx.array(float("nan"), dtype=bad.dtype), bad
    )
    save_weights(source, weights)
    with pytest.raises(CheckpointError, match="o_proj.weight holds NaN or infinite values"):
        quantize_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["error", "interrupt", "disk-full"])
def test_failure_part_way_leaves_no_output(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    source = make_checkpoint("src", shards=2)
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    if failure == "disk-full":
        real_pwrite, calls = os.pwrite, []

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            calls.append(offset)
            if len(calls) == 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(tensor_io.os, "pwrite", pwrite)
        expected: type[BaseException] = ConversionError
    else:
        real_rows, seen = convert_module.convert_rows, []
        expected = CheckpointError if failure == "error" else KeyboardInterrupt

        def convert_rows(job, *args):  # noqa: ANN001, ANN202 - a stand-in with the real signature
            seen.append(job.source.name)
            if len(seen) == 10:
                raise (
                    expected("model.layers.1: simulated failure")
                    if failure == "error"
                    else KeyboardInterrupt
                )
            return real_rows(job, *args)

        monkeypatch.setattr(convert_module, "convert_rows", convert_rows)
    with pytest.raises(expected) as caught:
        quantize_checkpoint(source, out_parent / "out", max_shard_size="20kB")
    if failure == "disk-full":
        assert "no space left on device" in str(caught.value)
    assert list(out_parent.iterdir()) == []


def test_failed_force_keeps_the_old_output(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_checkpoint("src")
    output = quantize_checkpoint(source, tmp_path / "out").output
    before = read_safetensors(output)

    def fail(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "convert_rows", fail)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, output, force=True, spec=QuantSpec(bits=8))
    after = read_safetensors(output)
    assert all(mx.array_equal(before[name], after[name]).item() for name in before)
    assert leftovers(tmp_path) == []


def test_too_little_disk_space_is_refused_up_front(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shutil import _ntuple_diskusage as shutil_usage

    import qwen3_mlx.quantize.folder as folder_module

    source = make_checkpoint("src")
    monkeypatch.setattr(
        folder_module.shutil, "disk_usage", lambda path: shutil_usage(1000, 1000, 1000)
    )
    with pytest.raises(ConversionError, match="no space left on device for the output"):
        quantize_checkpoint(source, tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


# Verify -----------------------------------------------------------------------------------------


def test_verify_measures_the_quantization_gap(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    same = verify_quantized(source, source)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert (same.prompts, same.positions, same.templated) == (4, 4 * 32, False)
    coarse = verify_quantized(
        source, quantize_checkpoint(source, tmp_path / "q2", spec=QuantSpec(bits=2)).output
    )
    fine = verify_quantized(
        source, quantize_checkpoint(source, tmp_path / "q8", spec=QuantSpec(bits=8)).output
    )
    assert 0 < fine.mean_kl < coarse.mean_kl
    assert fine.top1_agreement >= coarse.top1_agreement


def test_verify_renders_prompts_with_the_chat_template(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src", tokenizer="qwen3-4b")
    report = verify_quantized(source, quantize_checkpoint(source, tmp_path / "q4").output)
    assert report.templated and report.prompts == 4
    assert report.positions > 4 * 10  # "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n"
    assert report.mean_kl > 0 and 0 <= report.top1_agreement <= 1


# CLI --------------------------------------------------------------------------------------------


def cli_app():  # noqa: ANN201 - a typer.Typer
    """The real app when it registers the command; else a tiny one with just this command."""
    import typer

    try:
        from qwen3_mlx.cli.app import app
    except ImportError:
        from qwen3_mlx.cli.quantize_cmd import quantize_command

        app = typer.Typer()
        app.command("quantize")(quantize_command)
        app.command("noop")(lambda: None)  # keeps the command name on a one-command app
    return app


runner = CliRunner()


def test_cli_converts_verifies_and_summarises(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    output = tmp_path / "out"
    result = runner.invoke(
        cli_app(), ["quantize", str(source), str(output), "--bits", "8", "--verify"]
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Wrote {output} (1 shard, ")
    assert "8-bit, group size 64, bfloat16" in lines[1]
    assert "bits per weight" in lines[2] and lines[3].strip().startswith("time")
    assert lines[4].strip().startswith("verify        mean KL") and "top-1 agreement" in lines[4]
    assert (output / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "7"], "Error: unsupported bits 7: choose one of 2, 3, 4, 5, 6, 8"),
        (["--group-size", "100"], "Error: unsupported group size 100: choose one of 32, 64, 128"),
        (["--recipe", "fancy"], "Error: unknown recipe 'fancy': choose one of uniform, mixed_4_6"),
        (
            ["--recipe", "mixed_4_6", "--bits", "8"],
            "Error: --recipe mixed_4_6 sets the bits itself",
        ),
        (["--dtype", "int4"], "Error: unknown dtype 'int4'"),
        (["--max-shard-size", "lots"], "Error: bad shard size 'lots'"),
    ],
)
def test_cli_bad_options_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(cli_app(), ["quantize", str(tmp_path), str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message)


def test_cli_runtime_errors_exit_1_with_one_line(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    (tmp_path / "taken").mkdir()
    cases = [
        ([str(source), str(tmp_path / "taken")], "already exists (use --force to replace it)"),
        ([str(tmp_path / "missing"), str(tmp_path / "out")], "no such model folder"),
        (
            [str(make_checkpoint("llama", model_type="llama")), str(tmp_path / "out")],
            "model_type is 'llama'",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(cli_app(), ["quantize", *args])
        assert result.exit_code == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith("Error: ") and message in result.stderr


def test_cli_ctrl_c_exits_130_and_cleans_up(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "convert_rows", interrupt)
    source = make_checkpoint("src")
    out_parent = tmp_path / "models"
    result = runner.invoke(cli_app(), ["quantize", str(source), str(out_parent / "out")])
    assert result.exit_code == 130
    assert result.stderr.splitlines() == [
        f"Error: interrupted; {out_parent / 'out'} was not written"
    ]
    assert list(out_parent.iterdir()) == []


def test_bits_per_weight_counts_scales_and_biases(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    result = quantize_checkpoint(make_checkpoint("src"), tmp_path / "out")
    quantized = sum(
        math.prod(t.shape)
        for name, t in read_safetensors(make_checkpoint("again")).items()
        if "norm" not in name
    )
    norms = result.parameters - quantized
    # 4 bits + a bf16 scale and bias per 64 weights = 4.5 bits; norms stay 16 bits.
    assert result.bits_per_weight == pytest.approx(
        (4.5 * quantized + 16 * norms) / result.parameters
    )
