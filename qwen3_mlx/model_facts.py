"""What a model folder (or Hub repo) holds, read from its files without loading the weights: the
typed record `qwen3-mlx info` prints and a server's model listing can serve."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwen3_mlx.config import YARN_DEFAULT_FACTOR

TensorEntries = dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class ThinkingSwitches:
    """Which ways of turning thinking off the chat template honours."""

    hard_switch: bool  # enable_thinking=False
    soft_switch: bool  # /think and /no_think in a message
    prompt_opens_think: bool  # the generation prompt ends in <think> (Thinking-2507)


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling presets and stop ids the model ships with."""

    thinking: dict[str, float]
    non_thinking: dict[str, float] | None  # None: the model cannot turn thinking off
    eos_token_ids: list[int]


@dataclass(frozen=True)
class ModelFacts:
    """Architecture, size, quantization, memory, context, thinking switches and sampling defaults."""

    model: str  # as the user named it
    path: str | None  # the folder, None when only the Hub's small files were read
    architecture: str
    layers: int
    hidden_size: int
    attention_heads: int
    key_value_heads: int
    vocab_size: int
    parameters: int  # logical parameters (not packed words)
    tied_embeddings: bool
    checkpoint_dtype: str | None
    quantization: dict[str, Any] | None  # {"method": "mlx-affine" | "fp8", ...}
    weights_bytes_on_disk: int
    weights_bytes_in_memory: int
    compute_dtype: str
    cpu_kernels: str | None  # what computes the 4-bit layers in float32 on the CPU, else None
    context_length: int
    context_length_yarn: int | None  # with YaRN at yarn_factor; None when it adds nothing
    yarn_factor: float | None
    # KV cache bytes per token in the compute dtype and with --kv-bits 8 and 4 ("float32", "8",
    # "4"), and how many tokens of each fit in the memory free now beside the weights.
    kv_bytes_per_token: dict[str, int]
    kv_tokens_in_free_memory: dict[str, int] | None
    thinking: ThinkingSwitches
    generation_defaults: GenerationDefaults

    def as_dict(self) -> dict[str, Any]:
        """The facts as plain JSON-ready data."""
        return asdict(self)


@contextmanager
def model_files(path_or_repo: str) -> Iterator[tuple[Path, TensorEntries | None]]:
    """A folder with the model's small files, and its tensor headers when they came from the Hub."""
    from qwen3_mlx.hub import cached_snapshot, fetch_small_files, local_folder

    folder = local_folder(path_or_repo)
    if folder is not None:
        yield folder, None
        return
    cached = cached_snapshot(str(path_or_repo))
    if cached is not None:
        yield cached, None
        return
    with tempfile.TemporaryDirectory(prefix="qwen3-mlx-info-") as temporary:
        yield Path(temporary), fetch_small_files(str(path_or_repo), Path(temporary))


def describe_model(
    path_or_repo: str, *, compute_dtype: str = "auto", rope_factor: float = YARN_DEFAULT_FACTOR
) -> ModelFacts:
    """The facts of a model folder or repo id, its tensors checked against its config."""
    with model_files(path_or_repo) as (model_dir, entries):
        # A folder fetched for the occasion is gone afterwards: only a lasting one is worth naming.
        path = str(model_dir) if entries is None else None
        return _describe_folder(
            str(path_or_repo), path, model_dir, entries, compute_dtype, rope_factor
        )


def weight_bytes(
    entries: TensorEntries, compute_dtype: str | None, kept: set[str] = frozenset()
) -> tuple[int, int]:
    """(bytes on disk, bytes in memory once loaded) of the weights.

    On load, floating tensors (weights, norms, quantization scales) are cast to the compute dtype,
    except those named in kept; FP8 weights are dequantized (their scale_inv tensors dropped) and
    packed integers stay as they are.
    """
    from qwen3_mlx.dtypes import COMPUTE_DTYPES, SAFETENSORS_BYTES, SAFETENSORS_FLOATING

    disk = memory = 0
    for name, entry in entries.items():
        start, stop = entry["data_offsets"]
        disk += int(stop) - int(start)
        dtype, numel = entry["dtype"], _numel(entry["shape"])
        if name.endswith("_scale_inv"):
            continue
        if name in kept:  # as stored (an FP8 matrix as the bf16 it is dequantized to)
            memory += numel * 2 if dtype.startswith("F8") else int(stop) - int(start)
        elif dtype in SAFETENSORS_FLOATING or (
            dtype.startswith("F8") and name + "_scale_inv" in entries
        ):
            stored = 2 if dtype.startswith("F8") else SAFETENSORS_BYTES[dtype]  # FP8 -> bf16
            target = COMPUTE_DTYPES[compute_dtype].size if compute_dtype else stored
            memory += numel * target
        else:
            memory += int(stop) - int(start)
    return disk, memory


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def scales_read_in_place(
    config: dict[str, Any], entries: TensorEntries, compute_dtype: str | None, source: str
) -> set[str]:
    """The scale and bias tensors a float32 load keeps in the checkpoint's dtype: those of the
    4-bit layers the native kernel computes (see qwen3_mlx.cpu.quantized.scales_read_in_place)."""
    import mlx.core as mx

    from qwen3_mlx.cpu import native as native_kernel
    from qwen3_mlx.quant import read_quantization

    block = read_quantization(config, source)
    if block is None or compute_dtype != "float32" or mx.default_device() != mx.cpu:
        return set()
    dtypes = {"F32": mx.float32, "BF16": mx.bfloat16, "F16": mx.float16}
    kept = set()
    for name, entry in entries.items():
        path = name.removesuffix(".scales")
        if path == name or f"{path}.biases" not in entries:
            continue
        params = block[path] if isinstance(block.get(path), dict) else block
        dtype = dtypes.get(entry["dtype"])
        if dtype is not None and native_kernel.supports_layer(
            params["bits"], params["group_size"], block.get("mode", "affine"), dtype
        ):
            kept |= {name, f"{path}.biases"}
    return kept


def dense_weights_read_in_place(entries: TensorEntries, compute_dtype: str | None) -> set[str]:
    """The bf16 (and FP8, loaded as bf16) matrices a float32 load keeps bf16: all of them where
    the native bf16 matmul is in use (see qwen3_mlx.cpu.dense.weights_read_in_place)."""
    from qwen3_mlx.cpu.dense import native_dense

    if compute_dtype != "float32" or native_dense() is None:
        return set()
    return {
        name
        for name, entry in entries.items()
        if len(entry["shape"]) == 2
        and name.endswith(".weight")
        and (
            entry["dtype"] == "BF16"
            or (entry["dtype"].startswith("F8") and name + "_scale_inv" in entries)
        )
    }


def compute_dtype_name(compute_dtype: str) -> str | None:
    """The dtype name 'auto' means on this machine (None: the checkpoint's own)."""
    from qwen3_mlx.dtypes import dtype_name
    from qwen3_mlx.loading import resolve_compute_dtype

    dtype = resolve_compute_dtype(compute_dtype)
    return None if dtype is None else dtype_name(dtype)


def quantization_summary(config: dict[str, Any], source: str) -> dict[str, Any] | None:
    """Bits, group size and per-module overrides of an MLX checkpoint, or the FP8 block; None if neither."""
    from qwen3_mlx.fp8 import fp8_block_size
    from qwen3_mlx.quant import read_quantization

    block = read_quantization(config, source)
    if block is not None:
        overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
        return {
            "method": "mlx-affine",
            "bits": block["bits"],
            "group_size": block["group_size"],
            "overrides": len(overrides),
        }
    fp8 = fp8_block_size(config, source)
    if fp8 is not None:
        return {"method": "fp8", "block": list(fp8)}
    return None


def checked_parameter_count(
    args: Any, config: dict[str, Any], entries: TensorEntries, where: str
) -> int:
    """Logical parameters of the architecture, after checking the headers hold exactly its tensors.

    The same checks as loading, on the headers alone: the model is built lazily (nothing is
    allocated), and only once the headers' sizes agree with the config.
    """
    from mlx.utils import tree_flatten

    from qwen3_mlx.checkpoint_check import check_sizes, check_tensors, header_tensors, model_tensors
    from qwen3_mlx.model import Model
    from qwen3_mlx.quant import apply_checkpoint_quantization, read_quantization

    check_sizes(args, entries, where)
    model = Model(args)
    parameters = sum(value.size for _, value in tree_flatten(model.parameters()))
    block = read_quantization(config, where)
    if block is not None:
        apply_checkpoint_quantization(model, block, set(entries))
    found = model.sanitize(header_tensors(entries))
    check_tensors(model_tensors(model), found, Path(where).parent)
    return parameters


def _describe_folder(
    name: str,
    path: str | None,
    model_dir: Path,
    entries: TensorEntries | None,
    compute_dtype: str,
    rope_factor: float,
) -> ModelFacts:
    from qwen3_mlx.config import ModelArgs, read_config
    from qwen3_mlx.safetensors_check import tensor_headers, weight_files

    config = read_config(model_dir)
    source = str(model_dir / "config.json")
    args = ModelArgs.from_dict(config, source)
    entries = entries if entries is not None else tensor_headers(weight_files(model_dir))
    parameters = checked_parameter_count(args, config, entries, source)
    dtype_name = compute_dtype_name(compute_dtype)
    kept = scales_read_in_place(config, entries, dtype_name, source)
    kept |= dense_weights_read_in_place(entries, dtype_name)
    disk, memory = weight_bytes(entries, dtype_name, kept)
    yarn = _yarn_context(args, rope_factor)
    kv = _kv_bytes(args, dtype_name or _checkpoint_float(config))
    quantization = quantization_summary(config, source)
    return ModelFacts(
        model=name,
        path=path,
        architecture=(config.get("architectures") or ["Qwen3ForCausalLM"])[0],
        layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        attention_heads=args.num_attention_heads,
        key_value_heads=args.num_key_value_heads,
        vocab_size=args.vocab_size,
        parameters=parameters,
        tied_embeddings=args.tie_word_embeddings,
        checkpoint_dtype=config.get("torch_dtype") or config.get("dtype"),
        quantization=quantization,
        weights_bytes_on_disk=disk,
        weights_bytes_in_memory=memory,
        compute_dtype=dtype_name or "checkpoint",
        cpu_kernels=_cpu_kernels(quantization, dtype_name),
        context_length=args.context_length,
        context_length_yarn=yarn,
        yarn_factor=rope_factor if yarn else None,
        kv_bytes_per_token=kv,
        kv_tokens_in_free_memory=_tokens_in_free_memory(kv, memory),
        **_template_facts(model_dir, config),
    )


def _cpu_kernels(quantization: dict[str, Any] | None, dtype_name: str | None) -> str | None:
    """native.kernels_text() for a 4-bit checkpoint (quantization_summary) computed in float32,
    else None."""
    if dtype_name != "float32" or (quantization or {}).get("bits") != 4:
        return None
    from qwen3_mlx.cpu import native as native_kernel

    return native_kernel.kernels_text()


def _checkpoint_float(config: dict[str, Any]) -> str:
    """The float dtype activations take without a compute dtype: the checkpoint's (bf16 else)."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return name if name in ("float32", "float16", "bfloat16") else "bfloat16"


def _kv_bytes(args: Any, dtype: str) -> dict[str, int]:
    from qwen3_mlx.cache import kv_bytes_per_token
    from qwen3_mlx.dtypes import COMPUTE_DTYPES

    size = COMPUTE_DTYPES[dtype].size
    return {dtype: kv_bytes_per_token(args, None, size)} | {
        str(bits): kv_bytes_per_token(args, bits, size) for bits in (8, 4)
    }


def _tokens_in_free_memory(kv: dict[str, int], weights: int) -> dict[str, int] | None:
    from qwen3_mlx.limits import available_memory

    free = available_memory()
    if free is None:
        return None
    room = max(free - weights, 0)  # the model is not loaded yet: its weights will take this
    return {name: room // max(size, 1) for name, size in kv.items()}


def _yarn_context(args: Any, rope_factor: float) -> int | None:
    """The context YaRN at rope_factor gives, when the model is not scaled already and it adds any."""
    from qwen3_mlx.config import yarn_scaling

    if args.rope_scaling:
        return None
    yarn = args.with_rope_scaling(yarn_scaling(rope_factor)).context_length
    return yarn if yarn > args.context_length else None


def _template_facts(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The thinking switches and generation defaults, from the tokenizer and generation config."""
    from qwen3_mlx.generation_config import GenerationConfig
    from qwen3_mlx.settings import NON_THINKING_DEFAULTS, PRESET_NAMES
    from qwen3_mlx.tokenizer import load_tokenizer

    generation = GenerationConfig.from_model_dir(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    hybrid = tokenizer.has_thinking_switch
    return {
        "thinking": ThinkingSwitches(
            hard_switch=hybrid,
            soft_switch=hybrid,
            prompt_opens_think=tokenizer.opens_think_in_prompt,
        ),
        "generation_defaults": GenerationDefaults(
            thinking={name: getattr(generation, name) for name in PRESET_NAMES},
            non_thinking=dict(NON_THINKING_DEFAULTS) if hybrid else None,
            eos_token_ids=list(generation.eos_token_ids),
        ),
    }
