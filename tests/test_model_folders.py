"""Bad model folders (issue 12), library side: each one gives one Qwen3Error whose one-line message
names the file, the field and what was expected; nothing is built, read or rendered without bound
on the way there."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TOKENIZER_CONFIGS, TOKENIZER_DIR, read_safetensors, save_weights

from qwen3_mlx import model as model_module
from qwen3_mlx.errors import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    QuantizationError,
    TemplateError,
)
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.loading import load_model, resolve_model_path


def edit_json(path: Path, **changes) -> None:
    """Rewrite a JSON file with some keys set."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def one_line(error: pytest.ExceptionInfo, *fragments: str) -> str:
    """The error's message, checked to be one line holding every fragment."""
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a Model is built (the checks must come first)."""

    def refuse(self, args):
        pytest.fail(f"a model was built with {args.num_hidden_layers} layers")

    monkeypatch.setattr(model_module.Model, "__init__", refuse)


# --- config.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", 10_000_000),
        ("vocab_size", 10**12),
        ("hidden_size", 1 << 30),
        ("intermediate_size", 10**9),
    ],
)
def test_absurd_sizes_are_refused_by_name_before_building(
    tiny_checkpoint, never_built, field, value
):
    edit_json(tiny_checkpoint / "config.json", **{field: value})
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    one_line(error, "config.json", field, f"{value:,}", "at most")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("num_hidden_layers", 3, "the weights hold 2 layers"),
        ("vocab_size", 1024, "model.embed_tokens.weight has 512 rows"),
        ("intermediate_size", 256, "gate_proj.weight has 128 rows"),
        ("num_attention_heads", 8, "q_proj.weight has 64 rows"),
    ],
)
def test_sizes_disagreeing_with_the_headers_stop_before_building(
    tiny_checkpoint, never_built, field, value, expected
):
    """Plausible sizes that the weights contradict: refused from the headers alone."""
    edit_json(tiny_checkpoint / "config.json", **{field: value})
    if field == "num_attention_heads":
        edit_json(tiny_checkpoint / "config.json", num_key_value_heads=4)
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    one_line(error, "config.json", expected)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("rms_norm_eps", "1e-6", "must be a number"),
        ("rope_theta", "1000000", "must be a number"),
        ("rope_theta", -1.0, "must be positive"),
        ("rms_norm_eps", 5.0, "between 0 and 1"),
        ("num_hidden_layers", True, "must be a positive integer"),
        ("hidden_size", 64.0, "must be a positive integer"),
        ("head_dim", "16", "must be a positive integer"),
        ("tie_word_embeddings", "yes", "must be true or false"),
        ("rope_parameters", [1, 2], "must be an object"),
        ("rope_scaling", {"rope_type": "yarn", "factor": "4"}, "factor must be a number"),
    ],
)
def test_config_fields_of_the_wrong_type(tiny_checkpoint, field, value, expected):
    edit_json(tiny_checkpoint / "config.json", **{field: value})
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    one_line(error, "config.json", field, expected)


def test_a_nan_yarn_factor_is_refused(tiny_checkpoint):
    from qwen3_mlx.config import yarn_scaling

    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint, rope_scaling=yarn_scaling(math.nan))
    one_line(error, "YaRN factor", "nan")


# --- the index, and paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight_map", "expected"),
    [
        (None, "weight_map must be an object"),
        (["model-00001-of-00002.safetensors"], "weight_map must be an object"),
        ({"model.norm.weight": 3}, "must map tensor names to file names"),
    ],
    ids=["null", "list", "non-string"],
)
def test_bad_index_weight_map(make_checkpoint, weight_map, expected):
    model_dir = make_checkpoint(shards=2)
    edit_json(model_dir / "model.safetensors.index.json", weight_map=weight_map)
    with pytest.raises(CheckpointError) as error:
        load_model(model_dir)
    one_line(error, "model.safetensors.index.json", expected)


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_an_index_naming_a_file_outside_the_folder_is_never_read(
    make_checkpoint, tmp_path, monkeypatch, where
):
    """Security: the outside file is a valid checkpoint, so following the index would load it."""
    model_dir = make_checkpoint(shards=2)
    outside = make_checkpoint("elsewhere") / "model.safetensors"
    name = str(outside) if where == "absolute" else f"../elsewhere/{outside.name}"
    index = model_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    edit_json(index, weight_map=dict.fromkeys(weight_map, name))
    opened: list[str] = []
    real_load = mx.load
    monkeypatch.setattr(mx, "load", lambda path, *a, **k: opened.append(path) or real_load(path))
    with pytest.raises(CheckpointError) as error:
        load_model(model_dir)
    one_line(error, "model.safetensors.index.json", name, "outside the model folder")
    assert opened == []


def test_fp8_block_size_as_an_int(tiny_checkpoint):
    edit_json(
        tiny_checkpoint / "config.json",
        quantization_config={"quant_method": "fp8", "weight_block_size": 128},
    )
    with pytest.raises(QuantizationError) as error:
        load_model(tiny_checkpoint)
    one_line(error, "config.json", "weight_block_size", "[rows, cols]", "128")


def test_a_folder_that_cannot_be_read(tiny_checkpoint, monkeypatch):
    """Root reads any folder, so os.access is made to answer as it does for a user without rights."""
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != tiny_checkpoint and real_access(path, mode)
    )
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_path(tiny_checkpoint)
    one_line(error, str(tiny_checkpoint), "permission denied")


def test_a_folder_name_that_is_not_utf8(tiny_checkpoint, tmp_path):
    """MLX's loader throws std::bad_cast on such a path; it was reported as a corrupt checkpoint."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/model-\xff"))
    shutil.copytree(tiny_checkpoint, odd)
    with pytest.raises(CheckpointError) as error:
        load_model(odd)
    message = one_line(error, "not valid UTF-8", "rename the folder", "model-\\xff")
    assert "corrupt" not in message and "bad_cast" not in message
    message.encode("utf-8")  # printable as it is


# --- weights ----------------------------------------------------------------------------------


def rewrite(model_dir: Path, name: str, value) -> None:
    """Replace one tensor of a single-file checkpoint."""
    weights = read_safetensors(model_dir)
    weights[name] = value
    (model_dir / "model.safetensors").unlink()
    save_weights(model_dir, weights)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused_by_name(tiny_checkpoint, bad):
    name = "model.layers.1.mlp.down_proj.weight"
    weights = np.array(read_safetensors(tiny_checkpoint)[name].astype(mx.float32))
    weights[3, 5] = bad
    rewrite(tiny_checkpoint, name, mx.array(weights).astype(mx.bfloat16))
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    one_line(error, name, "NaN or infinite")
    lazy, _ = load_model(tiny_checkpoint, lazy=True)  # lazy leaves it to the first forward pass
    assert lazy.args.num_hidden_layers == 2


def test_non_finite_quantization_scales_are_refused(tiny_checkpoint, tmp_path):
    from mlx.utils import tree_flatten

    from qwen3_mlx.quant import QuantSpec, quantize_model, write_quantization

    model, config = load_model(tiny_checkpoint, compute_dtype="checkpoint")
    block = quantize_model(model, QuantSpec(bits=4, group_size=64))
    params = dict(tree_flatten(model.parameters()))
    name = "model.layers.0.self_attn.o_proj.scales"
    params[name] = mx.full(params[name].shape, math.nan, dtype=params[name].dtype)
    target = tmp_path / "q4"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(write_quantization(config, block)))
    mx.save_safetensors(str(target / "model.safetensors"), params)
    with pytest.raises(CheckpointError) as error:
        load_model(target)
    one_line(error, name, "NaN or infinite")


def test_an_integer_embedding_is_refused_by_name(tiny_checkpoint):
    name = "model.embed_tokens.weight"
    shape = read_safetensors(tiny_checkpoint)[name].shape
    rewrite(tiny_checkpoint, name, mx.zeros(shape, dtype=mx.int16))
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    one_line(error, name, "int16", "expected floating point")


# --- generation_config.json -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"temperature": -5}', "temperature"),
        ('{"top_p": 7}', "top_p"),
        ('{"top_k": -3}', "top_k"),
        ('{"temperature": NaN}', "temperature"),
        ('{"min_p": "low"}', "min_p"),
        ("[0.6, 0.95]", "expected a JSON object"),
        ('{"eos_token_id": "</s>"}', "eos_token_id"),
        ('{"eos_token_id": [151645, true]}', "eos_token_id"),
    ],
)
def test_bad_generation_config(tmp_path, content, fragment):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ConfigError) as error:
        GenerationConfig.from_model_dir(tmp_path)
    one_line(error, "generation_config.json", fragment)


def test_generation_config_not_utf8(tmp_path):
    (tmp_path / "generation_config.json").write_bytes(b'{"temperature": 0.6, "x": "\xff\xfe"}')
    with pytest.raises(ConfigError) as error:
        GenerationConfig.from_model_dir(tmp_path)
    one_line(error, "generation_config.json", "not UTF-8")


def test_good_generation_config_values_are_kept(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"temperature": 0, "top_p": 1, "top_k": 0, "eos_token_id": 7}'
    )
    config = GenerationConfig.from_model_dir(tmp_path)
    assert (config.temperature, config.top_p, config.top_k) == (0.0, 1.0, 0)
    assert config.eos_token_ids == (7,)


# --- chat templates ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    """The real Qwen3 tokenizer (read once); each test gives it its own template."""
    from qwen3_mlx.tokenizer import read_hf_tokenizer

    return read_hf_tokenizer(TOKENIZER_DIR)


def with_template(hf_tokenizer, template: str):
    from qwen3_mlx.tokenizer import Tokenizer

    hf_tokenizer.chat_template = template
    return Tokenizer(hf_tokenizer)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        (  # nested loops that would write 10^10 characters
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "characters",
        ),
        (  # a string doubled 40 times: a terabyte
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s }}",
            "characters",
        ),
        ("{{ 'x' * 200000000 }}", "characters"),
    ],
    ids=["nested-loops-output", "doubling-string", "huge-literal"],
)
def test_templates_that_would_eat_memory_are_stopped(hf_tokenizer, template, fragment):
    before = peak_rss_bytes()
    with pytest.raises(TemplateError) as error:
        with_template(hf_tokenizer, template).render_text(MESSAGES)
    one_line(error, "chat template is broken", fragment)
    # A bound of ~1 MB output: the process grew by far less than what was asked for (>= 200 MB).
    assert peak_rss_bytes() - before < 400 * 1024 * 1024


def test_a_template_that_never_finishes_is_stopped(hf_tokenizer, monkeypatch):
    """10^10 loop turns with no output: only the clock stops it (shortened here to 0.5 s)."""
    from qwen3_mlx import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "RENDER_SECONDS", 0.5)
    template = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError) as error:
        with_template(hf_tokenizer, template).render_text(MESSAGES)
    one_line(error, "chat template is broken", "ran past 0.5 s")


def test_a_real_template_still_renders(hf_tokenizer):
    template = json.loads(TOKENIZER_CONFIGS["qwen3-4b"].read_text())["chat_template"]
    text = with_template(hf_tokenizer, template).render_text(MESSAGES * 200)
    assert text.count("<|im_start|>user\nhi<|im_end|>") == 200


def test_oversized_template_and_template_file(hf_tokenizer, tiny_checkpoint):
    with pytest.raises(TemplateError) as error:
        with_template(hf_tokenizer, "x" * (2 << 20))
    one_line(error, "chat template", "2,097,152 characters")
    from qwen3_mlx.tokenizer import read_hf_tokenizer

    shutil.copy(TOKENIZER_DIR / "tokenizer.json", tiny_checkpoint / "tokenizer.json")
    with (tiny_checkpoint / "chat_template.jinja").open("wb") as handle:
        handle.truncate(2 << 30)  # a sparse 2 GB file: its size alone refuses it
    with pytest.raises(TemplateError) as error:
        read_hf_tokenizer(tiny_checkpoint)
    one_line(error, "chat_template.jinja", "2,147,483,648 bytes")


def test_a_null_sampling_value_is_named_not_silently_replaced(tmp_path):
    """Issue 27 (CLI audit): `temperature: null` was accepted silently."""
    from qwen3_mlx.generation_config import GenerationConfigWarning

    (tmp_path / "generation_config.json").write_text('{"temperature": null, "top_p": 0.9}')
    with pytest.warns(GenerationConfigWarning) as caught:
        config = GenerationConfig.from_model_dir(tmp_path)
    (warning,) = caught
    assert "temperature is null; using Qwen3's recommended temperature 0.6" in str(warning.message)
    assert (config.temperature, config.top_p) == (0.6, 0.9)
