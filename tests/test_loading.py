"""The loader: MLX 4-bit checkpoints as mlx-lm writes them, our 4-bit layout, lazy loading,
bad inputs (one Qwen3Error each, with a one-line message naming the problem), code never run
from a model folder, and the Hugging Face download path without network."""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import FIXTURES, read_safetensors, save_weights
from mlx.utils import tree_flatten

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.errors import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    QuantizationError,
    Qwen3Error,
)
from qwen3_mlx.loading import MODEL_FILE_PATTERNS, load, load_model, resolve_model_path
from qwen3_mlx.model import Model
from qwen3_mlx.quant import QuantSpec, apply_checkpoint_quantization, quantize_model

IDS = mx.array(np.random.default_rng(7).integers(0, 512, (1, 16)))


def logits(model) -> np.ndarray:
    """Logits of a fixed prompt."""
    return np.array(model(IDS).astype(mx.float32))


def mlx_lm_quantized_checkpoint(source: Path, target: Path, quant_predicate=None) -> Path:
    """What mlx_lm.convert(quantize=True) writes, through the same mlx-lm functions."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model as mlx_lm_quantize
    from mlx_lm.utils import save_config, save_model

    model, config = mlx_lm_load_model(source)
    model, config = mlx_lm_quantize(model, config, 64, 4, quant_predicate=quant_predicate)
    save_model(target, model)
    save_config(config, target / "config.json")
    return target


# --- MLX 4-bit checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mlx_lm_4bit_checkpoint_equals_our_in_memory_quantization(make_checkpoint, tmp_path, tied):
    source = make_checkpoint(tie_word_embeddings=tied)
    saved = mlx_lm_quantized_checkpoint(source, tmp_path / "mlx-4bit")
    assert json.loads((saved / "config.json").read_text())["quantization"]["bits"] == 4
    for dtype in ("checkpoint", "float32"):
        from_disk, _ = load_model(saved, compute_dtype=dtype)
        in_memory, _ = load_model(source, quantize_on_load=4, compute_dtype=dtype)
        assert isinstance(from_disk.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
        np.testing.assert_array_equal(logits(from_disk), logits(in_memory))


def test_mlx_lm_mixed_bits_checkpoint_equals_mlx_lm(make_checkpoint, tmp_path, float32_x):
    """Per-module overrides in the quantization block (here v_proj at 8 bits) are honoured: our
    logits equal mlx-lm's own load of the folder (both in float32, so summation order is the only
    difference), and differ clearly from the uniform 4-bit model's."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    def predicate(path: str, module: nn.Module) -> bool | dict:
        return {"group_size": 64, "bits": 8} if path.endswith("v_proj") else True

    source = make_checkpoint(tie_word_embeddings=False)
    saved = mlx_lm_quantized_checkpoint(source, tmp_path / "mixed", quant_predicate=predicate)
    ours, _ = load_model(saved, compute_dtype="float32")
    assert ours.model.layers[0].self_attn.v_proj.bits == 8
    assert ours.model.layers[0].self_attn.q_proj.bits == 4
    reference, _ = mlx_lm_load_model(saved)
    reference.set_dtype(mx.float32)
    ours_logits = logits(ours)
    np.testing.assert_allclose(ours_logits, logits(reference), rtol=0, atol=1e-3)
    uniform, _ = load_model(source, quantize_on_load=4, compute_dtype="float32")
    assert np.abs(ours_logits - logits(uniform)).max() > 0.1


def test_our_4bit_layout_for_a_tied_model(make_checkpoint):
    """weight uint32 [out, in/8], scales and biases [out, in/64], norms plain, no lm_head."""
    model, _ = load_model(make_checkpoint(), quantize_on_load=4, compute_dtype="checkpoint")
    params = dict(tree_flatten(model.parameters()))
    assert not any(name.startswith("lm_head") for name in params)
    quantized = {name.rsplit(".", 1)[0] for name in params if name.endswith(".scales")}
    assert "model.embed_tokens" in quantized
    assert len(quantized) == 1 + 7 * 2  # embedding + 7 Linears per layer
    for module in quantized:
        out_features, packed = params[f"{module}.weight"].shape
        assert params[f"{module}.weight"].dtype == mx.uint32
        for part in ("scales", "biases"):
            assert params[f"{module}.{part}"].shape == (out_features, packed * 8 // 64)
            assert params[f"{module}.{part}"].dtype == mx.bfloat16
    norms = [name for name in params if "norm" in name]
    assert len(norms) == 1 + 4 * 2
    assert all(params[name].dtype == mx.bfloat16 and params[name].ndim == 1 for name in norms)


def test_4bit_tensor_names_equal_mlx_community_qwen3_4b():
    """Our quantization of the real Qwen3-4B config gives exactly the published tensor names, and
    the published names turn the right modules into quantized ones. Shapes only: nothing is
    evaluated, so no 4B weights are ever allocated."""
    folder = FIXTURES / "mlx-community-Qwen3-4B-4bit"
    config = json.loads((folder / "config.json").read_text())
    published = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    args = ModelArgs.from_dict(config)
    ours = Model(args)
    quantize_model(ours, QuantSpec(bits=4, group_size=64))
    ours_params = dict(tree_flatten(ours.parameters()))
    assert set(ours_params) == published
    assert ours_params["model.layers.0.self_attn.q_proj.weight"].shape == (4096, 2560 // 8)
    assert ours_params["model.layers.0.mlp.down_proj.scales"].shape == (2560, 9728 // 64)
    loader_view = Model(args)
    apply_checkpoint_quantization(loader_view, config["quantization"], published)
    assert set(dict(tree_flatten(loader_view.parameters()))) == published


def test_load_returns_model_tokenizer_and_generation_config(make_checkpoint):
    model_dir = make_checkpoint(tokenizer="qwen3-4b")
    model, tokenizer, generation = load(model_dir)
    assert model.args.vocab_size == 151936
    assert tokenizer.encode("Hello world") == [9707, 1879]
    # Qwen3-4B's generation_config.json
    assert (generation.temperature, generation.top_p, generation.top_k) == (0.6, 0.95, 20)
    assert generation.eos_token_ids == (151645, 151643)


# --- lazy loading ---------------------------------------------------------------------------


def test_loading_peaks_near_the_model_size(make_checkpoint):
    """~44 MB of bf16 weights: loading must not hold two copies. Peak < 1.25x the larger of the
    checkpoint and the loaded model; measured 1.0x as stored, 1.08x cast to float32 (the model
    plus one of its four layers in flight: loading evaluates the embedding, then a layer at a
    time), 0.5x of the checkpoint when quantized to 4 bits on load."""
    model_dir = make_checkpoint(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=8192,
        tie_word_embeddings=False,
    )
    file_bytes = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    for compute_dtype, bits in [("checkpoint", None), ("float32", None), ("float32", 4)]:
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        model, _ = load_model(model_dir, compute_dtype=compute_dtype, quantize_on_load=bits)
        model_bytes = sum(value.nbytes for _, value in tree_flatten(model.parameters()))
        peak = mx.get_peak_memory() - before
        # The measure sees the weights (mx.load reads into MLX buffers, not an untracked mmap).
        assert mx.get_active_memory() - before >= 0.95 * model_bytes
        print(
            f"\n[memory] {compute_dtype} bits={bits}: file {file_bytes / 1e6:.1f} MB, "
            f"model {model_bytes / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB"
        )
        assert peak < 1.25 * max(file_bytes, model_bytes)
        del model


# --- bad inputs -----------------------------------------------------------------------------


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    """The message is one line and names what is wrong."""
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_tokenizer_errors_surface_from_the_background_load(make_checkpoint):
    """load() reads the tokenizer on a thread while the weights load; its errors still reach the
    caller as one-line CheckpointErrors, and a good weights load does not hide them."""
    model_dir = make_checkpoint(tokenizer="qwen3-4b")
    (model_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        load(model_dir)
    assert_one_line(error, str(model_dir), "cannot load the tokenizer")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as error:
        load(model_dir)
    assert_one_line(error, "no tokenizer.json")


def test_load_model_imports_nothing_while_the_tokenizer_thread_imports(make_checkpoint):
    """load() imports transformers on a thread during load_model; the main thread must not import
    at the same time (two threads importing a package in different orders can deadlock)."""
    model_dir = make_checkpoint()
    script = (
        "import sys; from pathlib import Path; from qwen3_mlx.loading import load_model; "
        "before = set(sys.modules); load_model(Path(sys.argv[1])); "
        "print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_hub_errors_become_one_line_model_not_found_errors():
    """The one mapping download and info share: each huggingface_hub failure names the repo and
    what to do; other errors pass through untouched."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from qwen3_mlx.loading import hub_errors

    response = httpx2.Response(403, request=httpx2.Request("GET", "http://localhost/"))
    cases = [
        (GatedRepoError("gated", response=response), "gated repo; accept its license"),
        (RepositoryNotFoundError("missing", response=response), "no such Hugging Face repo"),
        (LocalEntryNotFoundError("offline"), "the Hub cannot be reached (offline?)"),
        (HfHubHTTPError("boom", response=response), "fetch failed (HfHubHTTPError: boom"),
        (ConnectionResetError("reset"), "fetch failed (ConnectionResetError: reset)"),
    ]
    for raised, expected in cases:
        with pytest.raises(ModelNotFoundError) as error, hub_errors("owner/repo", "fetch failed"):
            raise raised
        assert_one_line(error, "owner/repo: ", expected)
    with pytest.raises(CheckpointError), hub_errors("owner/repo", "fetch failed"):
        raise CheckpointError("passes through")


def test_offline_from_a_checkout_names_the_shipped_tiny_model(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from qwen3_mlx.loading import hub_errors

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(ModelNotFoundError) as error, hub_errors("Qwen/Qwen3-4B", "fetch failed"):
        raise LocalEntryNotFoundError("offline")
    assert_one_line(error, "Qwen/Qwen3-4B: ", "cannot be reached (offline?)")
    assert str(error.value).endswith(
        "; to try the tiny model this checkout ships, use --model models/qwen3-tiny-chat"
    )


def edit_config(model_dir: Path, **changes) -> None:
    """Rewrite config.json with some keys changed (None removes a key)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_model_type_not_qwen3(tiny_checkpoint):
    edit_config(tiny_checkpoint, model_type="llama")
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "config.json", "'llama'", "qwen3")


def test_missing_required_config_key(tiny_checkpoint):
    edit_config(tiny_checkpoint, num_key_value_heads=None)
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "config.json", "num_key_value_heads")


def test_unsupported_rope_type(tiny_checkpoint):
    edit_config(tiny_checkpoint, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "config.json", "'linear'")


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as error:
        load(missing)
    assert_one_line(error, str(missing))


def test_folder_without_config(tiny_checkpoint):
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "config.json", "not found")


def test_config_not_json(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "config.json")


def test_partial_folder_missing_shard(make_checkpoint):
    model_dir = make_checkpoint(shards=3)
    (model_dir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        load_model(model_dir)
    assert_one_line(error, "model.safetensors.index.json", "model-00002-of-00003.safetensors")


def test_truncated_safetensors(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"  # the JSON header now starts with bytes that are not JSON
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "model.safetensors", "corrupt")


def rewrite_weights(model_dir: Path, change) -> None:
    """Apply change(weights) to the tensors of a single-file checkpoint and save them back."""
    weights = read_safetensors(model_dir)
    change(weights)
    (model_dir / "model.safetensors").unlink()
    save_weights(model_dir, weights)


def test_missing_tensor(tiny_checkpoint):
    rewrite_weights(tiny_checkpoint, lambda w: w.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "model.layers.1.self_attn.k_norm.weight", "missing")


def test_missing_lm_head_of_an_untied_model(make_checkpoint):
    model_dir = make_checkpoint(tie_word_embeddings=False)
    rewrite_weights(model_dir, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(CheckpointError) as error:
        load_model(model_dir)
    assert_one_line(error, "lm_head.weight", "missing")


def test_tensor_with_wrong_shape(tiny_checkpoint):
    def shrink(weights):
        weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][
            :100
        ]

    rewrite_weights(tiny_checkpoint, shrink)
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "model.layers.0.mlp.up_proj.weight", "(100, 64)", "(128, 64)")


@pytest.mark.parametrize(
    ("key", "block", "fragment"),
    [
        ("quantization", {"group_size": 64, "bits": 7}, "bits=7"),
        ("quantization", {"group_size": 48, "bits": 4}, "group_size=48"),
        ("quantization", {"group_size": 32, "bits": 4, "mode": "mxfp4"}, "'mxfp4'"),
        ("quantization_config", {"quant_method": "awq", "bits": 4}, "'awq'"),
        ("quantization_config", {"quant_method": "fp8", "fmt": "e5m2"}, "'e5m2'"),
    ],
    ids=["bad-bits", "bad-group-size", "bad-mode", "unknown-quant-method", "fp8-e5m2"],
)
def test_unknown_quantization(tiny_checkpoint, key, block, fragment):
    edit_config(tiny_checkpoint, **{key: block})
    with pytest.raises(QuantizationError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "config.json", fragment)


def test_unsupported_quantize_on_load_bits(tiny_checkpoint):
    with pytest.raises(QuantizationError) as error:
        load_model(tiny_checkpoint, quantize_on_load=7)
    assert_one_line(error, "bits 7")


def test_quantize_on_load_of_a_quantized_checkpoint(tiny_checkpoint, tmp_path):
    saved = mlx_lm_quantized_checkpoint(tiny_checkpoint, tmp_path / "q")
    with pytest.raises(QuantizationError) as error:
        load_model(saved, quantize_on_load=4)
    assert_one_line(error, "already quantized")


class _Trap:
    """Unpickling this creates a marker file: proof that a .bin was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pytorch_bin_is_never_unpickled(tiny_checkpoint, tmp_path):
    (tiny_checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (tiny_checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_checkpoint)
    assert_one_line(error, "no *.safetensors")
    assert not marker.exists()


def test_code_in_the_model_folder_is_never_run(make_checkpoint, tmp_path):
    """auto_map entries pointing at .py files (config and tokenizer) are ignored, not imported."""
    model_dir = make_checkpoint(tokenizer="qwen3-4b")
    marker = tmp_path / "executed"
    code = (
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    for name in ("tokenization_evil.py", "modeling_evil.py", "configuration_evil.py"):
        (model_dir / name).write_text(code)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "EvilTokenizer"
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    edit_config(
        model_dir,
        auto_map={"AutoConfig": "configuration_evil.C", "AutoModelForCausalLM": "modeling_evil.M"},
    )
    try:
        model, tokenizer, _ = load(model_dir)
        assert tokenizer.encode("Hello world") == [9707, 1879]
    except Qwen3Error:
        pass  # refusing the folder is fine too; running its code is not
    assert not marker.exists()


# --- Hugging Face repos, without network ----------------------------------------------------

REPO_FILES = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "merges.txt",
    "vocab.json",
    "pytorch_model.bin",
    "pytorch_model-00001-of-00002.bin",
    "modeling_qwen3.py",
    "tokenization_qwen3.py",
    "original/consolidated.pth",
    "model.gguf",
    "flax_model.msgpack",
    "tf_model.h5",
]


def test_download_fetches_only_needed_files():
    from huggingface_hub.utils import filter_repo_objects

    fetched = set(filter_repo_objects(REPO_FILES, allow_patterns=MODEL_FILE_PATTERNS))
    needed = {
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "merges.txt",
    }
    assert needed <= fetched
    code_or_pickle = (".bin", ".py", ".pth", ".gguf", ".msgpack", ".h5")
    assert not [name for name in fetched if name.endswith(code_or_pickle)]


def test_repo_id_asks_the_hf_cache_first(monkeypatch, tiny_checkpoint):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def cached(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert resolve_model_path("Qwen/Qwen3-4B") == tiny_checkpoint
    assert len(calls) == 1
    assert calls[0][0] == "Qwen/Qwen3-4B"
    assert calls[0][1]["local_files_only"] is True
    assert calls[0][1]["allow_patterns"] == MODEL_FILE_PATTERNS

    calls.clear()

    def not_cached(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    assert resolve_model_path("Qwen/Qwen3-4B") == tiny_checkpoint
    assert [kwargs.get("local_files_only", False) for _, kwargs in calls] == [True, False]
    assert calls[1][1]["allow_patterns"] == MODEL_FILE_PATTERNS


def test_download_through_snapshot_download_without_network(monkeypatch, tmp_path, capfd):
    """The real snapshot_download with only the Hub's HTTP calls faked: it fetches just the needed
    files of a repo listing, and progress=False (the default for load) prints nothing."""
    import types

    import huggingface_hub._snapshot_download as snapshot_module
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile

    from qwen3_mlx.loading import download_model

    commit = "f" * 40
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        HfApi, "repo_info", lambda self, repo_id, **_: types.SimpleNamespace(sha=commit)
    )
    listing = [RepoFile(path=name, size=1, oid="0" * 40) for name in REPO_FILES]
    monkeypatch.setattr(HfApi, "list_repo_tree", lambda self, repo_id, **_: listing)
    fetched = []

    def fake_file_download(repo_id, filename, **kwargs):
        fetched.append(filename)
        with kwargs["tqdm_class"](total=1, initial=0) as bar:  # as hf_hub_download reports
            bar.update(1)
        path = Path(constants.HF_HUB_CACHE, "models--acme--qwen3", "snapshots", commit, filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        return str(path)

    monkeypatch.setattr(snapshot_module, "hf_hub_download", fake_file_download)
    path = download_model("acme/qwen3", progress=False)
    assert path.name == commit
    assert sorted(fetched) == sorted(
        name
        for name in REPO_FILES
        if name.endswith((".safetensors", ".json", ".jinja"))
        or name in ("merges.txt", "LICENSE", "README.md")
    )
    assert capfd.readouterr().err == ""


RESOLVE_SCRIPT = """
import json, sys
from qwen3_mlx.loading import resolve_model_path
result = {}
for repo in sys.argv[1:]:
    try:
        result[repo] = {"path": str(resolve_model_path(repo))}
    except Exception as error:
        result[repo] = {"type": type(error).__name__, "message": str(error),
                        "chained": error.__cause__ is not None or not error.__suppress_context__}
print(json.dumps(result))
"""


def test_offline_repo_ids_use_the_hf_cache(tiny_checkpoint, tmp_path):
    """HF_HUB_OFFLINE=1 with HF_HUB_CACHE holding one snapshot: that repo resolves to the cached
    snapshot, an uncached one is a ModelNotFoundError without a chained traceback."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--acme--tiny-qwen3"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in tiny_checkpoint.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE_SCRIPT, "acme/tiny-qwen3", "acme/not-cached"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert Path(result["acme/tiny-qwen3"]["path"]) == snapshot
    missing = result["acme/not-cached"]
    assert missing["type"] == "ModelNotFoundError"
    assert "\n" not in missing["message"] and "acme/not-cached" in missing["message"]
    assert not missing["chained"]
    model, _ = load_model(snapshot)
    assert model.args.vocab_size == 512


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch) -> None:
    from qwen3_mlx import loading
    from qwen3_mlx.errors import ModelNotFoundError

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "download_model", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        loading.resolve_model_path("models/qwen3-tiny")
