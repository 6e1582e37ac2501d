"""The `qwen3-mlx` commands through Typer's CliRunner: success paths, errors and exit codes.

The model is a tiny random-weight Qwen3 with the real tokenizer and chat template (tests/checkpoints.py);
answers are checked against the Chat API driven directly with the same settings.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from typer.testing import CliRunner

from qwen3_mlx.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", tokenizer="qwen3-4b")


@pytest.fixture(scope="module", autouse=True)
def tokenizers_loaded_once() -> Iterator[None]:
    """Each CliRunner call loads its model in this process; the tokenizer (about a second to
    build from tokenizer.json) is read once per folder here, to keep the module fast."""
    from qwen3_mlx import tokenizer

    cached = functools.lru_cache(maxsize=None)(tokenizer.read_hf_tokenizer)

    def read(model_dir: Path):
        return cached(Path(model_dir))

    with pytest.MonkeyPatch.context() as patch:
        # load() and load_tokenizer() both read through this module-level function.
        patch.setattr(tokenizer, "read_hf_tokenizer", read)
        yield


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user config, history or HF cache leaks in; the Hub is never contacted."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("QWEN3_MLX_MODEL", raising=False)
    from huggingface_hub import constants  # read its environment once, at import

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


@functools.cache
def direct_answer(model_dir: Path, text: str, **sampling) -> str:
    """The answer the Chat API gives, for comparison with the CLI's output."""
    from qwen3_mlx.chat import Chat

    chat = Chat.from_pretrained(str(model_dir), thinking=False, sampling=sampling)
    return chat.send(text).text()


# --- the app itself -----------------------------------------------------------------------------


def test_help_imports_neither_mlx_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from qwen3_mlx.cli.app import main\n"
        "sys.argv = ['qwen3-mlx', '--help']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'transformers', 'torch'))\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] CODE 0" in out.stdout, out.stdout + out.stderr
    for command in ("chat", "prompt", "download", "info", "quantize"):
        assert command in out.stdout


def test_python_dash_m_runs_the_app() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qwen3_mlx", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "qwen3-mlx 0.1.0"


def test_version_and_short_help() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == "qwen3-mlx 0.1.0"
    result = invoke("prompt", "-h")
    assert result.exit_code == 0 and "--max-tokens" in result.stdout and "--json" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["prompt", "hi", "--bogus"],
        ["chat", "--temp", "-1"],
        ["prompt", "hi", "--top-p", "1.5"],
        ["prompt", "hi", "--compute-dtype", "int8"],
        ["nosuchcommand"],
    ],
)
def test_bad_flags_are_usage_errors(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_usage_errors_detected_in_the_command(model_dir: Path, tmp_path: Path) -> None:
    system_file = tmp_path / "system.txt"
    system_file.write_text("Be brief.")
    both = invoke(
        "prompt", "hi", "-m", str(model_dir), "--system", "x", "--system-file", str(system_file)
    )
    assert both.exit_code == 2 and "not both" in both.stderr
    factor = invoke("prompt", "hi", "-m", str(model_dir), "--rope-factor", "4")
    assert factor.exit_code == 2 and "--rope-scaling yarn" in factor.stderr
    empty = invoke("prompt", "-m", str(model_dir), input="  \n")
    assert empty.exit_code == 2 and "empty" in empty.stderr


def test_bad_model_path_is_one_error_line(tmp_path: Path) -> None:
    result = invoke("prompt", "hi", "-m", str(tmp_path / "missing"))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {tmp_path / 'missing'}: no such model folder (nor a Hugging Face repo id 'owner/name')"
    ]
    assert result.stdout == ""


def test_broken_model_folder_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    result = invoke("info", str(tmp_path / "broken"))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "config.json" in lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    # Every command reads --debug from its own context (quantize included).
    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    for command in (["prompt", "hi", "-m", missing], ["quantize", missing, out]):
        result = invoke("--debug", *command)
        assert result.exit_code == 1
        assert "Traceback (most recent call last)" in result.stderr
        assert "ModelNotFoundError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("Error: ")


# --- prompt -------------------------------------------------------------------------------------


def test_prompt_prints_the_answer(model_dir: Path) -> None:
    result = invoke(
        "prompt",
        "What is 2 + 3?",
        "-m",
        str(model_dir),
        "--no-think",
        "--temp",
        "0",
        "--max-tokens",
        "6",
    )
    assert result.exit_code == 0, result.stderr
    expected = direct_answer(model_dir, "What is 2 + 3?", temperature=0, max_tokens=6)
    assert expected and result.stdout == expected + "\n"
    assert "\x1b[" not in result.stdout  # no colours in a pipe
    assert result.stderr == ""


def test_prompt_reads_stdin_and_dash(model_dir: Path) -> None:
    flags = ["-m", str(model_dir), "--no-think", "--temp", "0", "--max-tokens", "6"]
    piped = invoke("prompt", *flags, input="What is 2 + 3?\n")
    dash = invoke("prompt", "-", *flags, input="What is 2 + 3?")
    assert piped.exit_code == dash.exit_code == 0
    expected = direct_answer(model_dir, "What is 2 + 3?", temperature=0, max_tokens=6)
    assert piped.stdout == dash.stdout == expected + "\n"


def test_prompt_json(model_dir: Path) -> None:
    result = invoke(
        "prompt", "hello", "-m", str(model_dir), "--json", "--max-tokens", "4", "--seed", "3"
    )
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"model", "thinking", "answer", "finish_reason", "tool_calls", "stats"}
    assert body["finish_reason"] == "length" and body["tool_calls"] == []
    assert body["stats"]["generated_tokens"] == 4
    assert body["stats"]["prompt_tokens"] > 0 and body["stats"]["decode_tokens_per_second"] > 0


def test_greedy_thinking_warns_on_one_stderr_line(model_dir: Path) -> None:
    result = invoke("prompt", "hello", "-m", str(model_dir), "--temp", "0", "--max-tokens", "2")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "Warning: temperature 0 (greedy decoding) in thinking mode can loop endlessly; Qwen3 recommends temperature 0.6"
    ]


def test_prompt_transcript_continues_and_is_saved(model_dir: Path, tmp_path: Path) -> None:
    transcript = tmp_path / "conversation.json"
    base = ["-m", str(model_dir), "--transcript", str(transcript)]
    first = invoke("prompt", "first question", *base, "--max-tokens", "4", "--system", "Be brief.")
    # Continuing: the system prompt comes from the file; a flag given now overrides the file.
    second = invoke("prompt", "second question", *base, "--max-tokens", "3", "--json")
    assert first.exit_code == second.exit_code == 0, first.stderr + second.stderr
    assert json.loads(second.stdout)["stats"]["generated_tokens"] == 3
    saved = json.loads(transcript.read_text())
    assert [m["role"] for m in saved["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert saved["messages"][0]["content"] == "Be brief."
    assert saved["messages"][4]["content"] == json.loads(second.stdout)["answer"]
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == [
        "first question",
        "second question",
    ]
    assert saved["explicit_settings"]["max_tokens"] == 3
    assert all("<think>" not in m["content"] for m in saved["messages"])


def test_prompt_bad_transcript_is_runtime_error(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = invoke("prompt", "hi", "-m", str(model_dir), "--transcript", str(bad))
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and "bad.json" in result.stderr


def test_no_think_on_an_always_thinking_model(tmp_path: Path) -> None:
    thinker = make_checkpoint(tmp_path / "thinker", tokenizer="qwen3-4b-thinking-2507")
    result = invoke("prompt", "hi", "-m", str(thinker), "--no-think")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: this model always thinks")


# --- chat without a terminal --------------------------------------------------------------------


def test_chat_reads_lines_from_a_pipe(model_dir: Path) -> None:
    lines = "/no_think\nWhat is 1 + 1?\n/settings\n/context\n/frob\n"
    result = invoke("chat", "-m", str(model_dir), "--max-tokens", "5", "--temp", "0", input=lines)
    assert result.exit_code == 0, result.stderr
    expected = direct_answer(model_dir, "What is 1 + 1?", temperature=0, max_tokens=5)
    assert expected in result.stdout
    assert "thinking off · temp 0" in result.stdout
    assert "tokens used" in result.stdout and "Unknown command /frob" in result.stdout
    assert "\x1b[" not in result.stdout


# --- info and download --------------------------------------------------------------------------


def test_info_describes_the_model_without_loading_it(model_dir: Path) -> None:
    result = invoke("info", str(model_dir), "--json")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    import mlx.core as mx

    stored = mx.load(str(model_dir / "model.safetensors"))  # a tied, unquantized checkpoint
    assert facts["parameters"] == sum(v.size for v in stored.values())
    assert facts["quantization"] is None
    assert facts["weights_bytes_on_disk"] == sum(v.nbytes for v in stored.values())
    # Under float32 compute on the CPU the vectors widen to float32; the bf16 matrices stay bf16
    # where the native bf16 matmul reads them in place, and widen too without it.
    from qwen3_mlx.cpu.dense import native_dense

    in_place = native_dense() is not None and mx.default_device() == mx.cpu
    assert facts["weights_bytes_in_memory"] == sum(
        v.nbytes * (1 if in_place and v.ndim == 2 else 2) for v in stored.values()
    )
    assert facts["thinking"] == {
        "hard_switch": True,
        "soft_switch": True,
        "prompt_opens_think": False,
    }
    assert facts["context_length"] == 4096 and facts["context_length_yarn"] == 131072
    config = json.loads((model_dir / "config.json").read_text())
    elements = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
    groups = elements // 64  # a bf16 scale and bias per group of 64, whatever the compute dtype
    assert facts["kv_bytes_per_token"] == {
        "float32": 4 * elements,
        "8": elements + groups * 4,
        "4": elements // 2 + groups * 4,
    }
    free = facts["kv_tokens_in_free_memory"]
    assert free is None or free["8"] > 3 * free["float32"] > 0
    assert facts["generation_defaults"]["thinking"]["temperature"] == 0.6
    assert facts["generation_defaults"]["eos_token_ids"] == [151645, 151643]
    text = invoke("info", str(model_dir))
    assert (
        text.exit_code == 0
        and "hard (enable_thinking): yes" in text.stdout
        and "131,072" in text.stdout
        and "a token as float32" in text.stdout
    )


def test_info_on_a_quantized_thinking_2507_model(tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen3_mlx.config import read_config
    from qwen3_mlx.loading import load_model
    from qwen3_mlx.quant import QuantSpec, quantize_model, write_quantization

    source = make_checkpoint(
        tmp_path / "full",
        tokenizer="qwen3-4b-thinking-2507",
        hidden_size=128,
        intermediate_size=256,
    )
    model, _ = load_model(source, compute_dtype="checkpoint")
    block = quantize_model(model, QuantSpec(bits=4, group_size=64, recipe="mixed_4_6"))
    target = tmp_path / "q4"
    target.mkdir()
    for name in ("tokenizer.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    (target / "config.json").write_text(json.dumps(write_quantization(read_config(source), block)))
    mx.save_safetensors(str(target / "model.safetensors"), dict(tree_flatten(model.parameters())))
    result = invoke("info", str(target), "--json", "--compute-dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    overrides = sum(isinstance(v, dict) for v in block.values())
    assert overrides > 0
    assert facts["quantization"] == {
        "method": "mlx-affine",
        "bits": 4,
        "group_size": 64,
        "overrides": overrides,
    }
    assert facts["thinking"] == {
        "hard_switch": False,
        "soft_switch": False,
        "prompt_opens_think": True,
    }
    assert facts["generation_defaults"]["non_thinking"] is None
    full = json.loads(invoke("info", str(source), "--json").stdout)
    assert facts["parameters"] == full["parameters"]  # logical parameters, not packed words
    assert facts["weights_bytes_on_disk"] < full["weights_bytes_on_disk"]


def test_model_precedence_flag_env_config_default(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config" / "qwen3-mlx" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'model = "{model_dir}"\n')
    assert json.loads(invoke("info", "--json").stdout)["path"] == str(model_dir)
    other = make_checkpoint(tmp_path / "other", tokenizer="qwen3-4b")
    monkeypatch.setenv("QWEN3_MLX_MODEL", str(other))
    assert json.loads(invoke("info", "--json").stdout)["path"] == str(other)
    assert json.loads(invoke("info", str(model_dir), "--json").stdout)["path"] == str(model_dir)
    monkeypatch.delenv("QWEN3_MLX_MODEL")
    config.unlink()
    result = invoke("info")  # the default repo: not cached, and offline
    assert result.exit_code == 1 and "Qwen/Qwen3-4B-MLX-4bit" in result.stderr


def test_bad_config_file_is_one_error_line(tmp_path: Path) -> None:
    config = tmp_path / "config" / "qwen3-mlx" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("model = \n")
    result = invoke("info")
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {config}: not valid TOML")
    config.write_text('colour = "blue"\n')
    assert "unknown setting 'colour'" in invoke("info").stderr


def test_download_from_the_cache_prints_the_folder(tmp_path: Path) -> None:
    snapshot = tmp_path / "hf" / "hub" / "models--owner--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    result = invoke("download", "owner/tiny")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_download_errors(tmp_path: Path, model_dir: Path) -> None:
    offline = invoke("download", "owner/not-cached")
    assert offline.exit_code == 1
    assert len(offline.stderr.splitlines()) == 1 and offline.stderr.startswith(
        "Error: owner/not-cached"
    )
    local = invoke("download", str(model_dir))
    assert local.exit_code == 2 and "local folder" in local.stderr
    for bad in ("x/y z", "x/-y", "x/y..z", "x/" + "y" * 97):  # the Hub refuses these names
        spaced = invoke("download", bad)
        assert spaced.exit_code == 2 and "is not a Hugging Face repo id" in spaced.stderr
        assert "HFValidationError" not in spaced.stderr


TRAINED = Path(__file__).resolve().parent.parent / "models" / "qwen3-tiny-chat"


def test_prompt_answer_to_stdout_thinking_to_stderr() -> None:
    flags = ["What is 12 + 30?", "-m", str(TRAINED), "--seed", "0", "--max-tokens", "150"]
    body = json.loads(invoke("prompt", *flags, "--json").stdout)
    assert body["thinking"] and body["answer"] and body["finish_reason"] == "stop"
    shown = invoke("prompt", *flags, "--show-thinking")
    assert shown.exit_code == 0
    assert shown.stdout == body["answer"] + "\n"
    assert shown.stderr == body["thinking"] + "\n"
    hidden = invoke("prompt", *flags)
    assert hidden.stdout == body["answer"] + "\n" and hidden.stderr == ""


def test_info_on_an_uncached_repo_reads_headers_not_weights(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub is played by the local checkpoint: small files are copied, headers parsed from it."""
    import shutil
    from fnmatch import fnmatch
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from qwen3_mlx.safetensors_check import read_header

    fetched: list[str] = []

    def fake_snapshot_download(
        repo_id, *, allow_patterns, local_dir=None, local_files_only=False, **_
    ):
        assert repo_id == "owner/tiny"
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        for path in model_dir.iterdir():
            if any(fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, Path(local_dir) / path.name)
                fetched.append(path.name)
        return local_dir

    def fake_metadata(repo_id, **_):
        header = read_header(model_dir / "model.safetensors")
        tensors = {
            name: SimpleNamespace(
                dtype=entry["dtype"], shape=entry["shape"], data_offsets=entry["data_offsets"]
            )
            for name, entry in header.items()
            if name != "__metadata__"
        }
        return SimpleNamespace(
            files_metadata={"model.safetensors": SimpleNamespace(tensors=tensors)}
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake_metadata)
    remote = invoke("info", "owner/tiny", "--json")
    assert remote.exit_code == 0, remote.stderr
    assert fetched and not any(name.endswith(".safetensors") for name in fetched)
    facts = json.loads(remote.stdout)
    local = json.loads(invoke("info", str(model_dir), "--json").stdout)
    assert facts["path"] is None
    varying = ("model", "path", "kv_tokens_in_free_memory")  # free memory moves between calls
    assert {k: v for k, v in facts.items() if k not in varying} == {
        k: v for k, v in local.items() if k not in varying
    }
    assert "not downloaded" in invoke("info", "owner/tiny").stdout


def test_info_on_a_cached_repo_uses_the_cache(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--owner--cached" / "snapshots" / ("b" * 40)
    shutil.copytree(model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("b" * 40)
    result = invoke("info", "owner/cached", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(snapshot)


def test_prompt_with_a_draft_model_is_exact_and_reports_acceptance(model_dir: Path) -> None:
    """The model drafting for itself: the answer is plain decoding's, every draft is accepted."""
    flags = ["-m", str(model_dir), "--no-think", "--temp", "0", "--max-tokens", "8", "--json"]
    result = invoke("prompt", "What is 2 + 3?", *flags, "--draft-model", str(model_dir))
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["answer"] == direct_answer(model_dir, "What is 2 + 3?", temperature=0, max_tokens=8)
    stats = body["stats"]
    assert stats["drafted_tokens"] > 0 and stats["draft_acceptance"] == 1.0
    assert stats["tokens_per_target_step"] > 1
    assert stats["target_steps"] < stats["generated_tokens"]


def test_draft_flags_are_checked(model_dir: Path, tmp_path: Path) -> None:
    base = ["prompt", "hi", "-m", str(model_dir)]
    both = invoke(*base, "--draft", "ngram", "--draft-model", str(model_dir))
    alone = invoke(*base, "--draft-tokens", "3")
    assert both.exit_code == alone.exit_code == 2
    assert "give --draft-model or --draft ngram, not both" in both.stderr
    assert "needs --draft-model or --draft ngram" in alone.stderr
    other = make_checkpoint(tmp_path / "other", tokenizer="qwen3-4b", vocab_size=151_680)
    refused = invoke(*base, "--draft-model", str(other))
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Error: {other} cannot draft for this model: its vocabulary has 151,680 ids, "
        "the target's 151,936"
    )
    info = invoke("info", str(model_dir), "--draft-model", str(other))
    assert info.exit_code == 0, info.stderr
    assert "not compatible, its vocabulary has 151,680 ids" in info.stdout
    same = json.loads(
        invoke("info", str(model_dir), "--json", "--draft-model", str(model_dir)).stdout
    )
    assert same["draft"]["compatible"] is True


def test_config_file_turns_on_ngram_drafting(model_dir: Path, isolated_env: Path) -> None:
    config = isolated_env / "config" / "qwen3-mlx" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('draft = "ngram"\ndraft_tokens = 3\n')
    flags = ["-m", str(model_dir), "--no-think", "--temp", "0", "--max-tokens", "6"]
    result = invoke("--debug", "prompt", "What is 2 + 3?", *flags)
    assert result.exit_code == 0, result.stderr
    assert "speculative decoding: ngram drafts 3 tokens a step" in result.stderr
    assert (
        result.stdout
        == direct_answer(model_dir, "What is 2 + 3?", temperature=0, max_tokens=6) + "\n"
    )
