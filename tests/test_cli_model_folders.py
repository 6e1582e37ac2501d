"""Bad model folders and a stalled Hub through the commands (issue 12): `info` and `prompt` give one
`Error: ...` line and exit 1, with the same rule for paths and repo ids, and `info` checks a folder
as loading does."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoints import make_checkpoint, read_safetensors, save_weights
from typer.testing import CliRunner

from qwen3_mlx.cli.app import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config, an empty offline Hub cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("QWEN3_MLX_MODEL", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", autouse=True)
def tokenizers_read_once() -> Iterator[None]:
    """Each command reads its tokenizer in this process (about a second); once per folder here."""
    import functools

    from qwen3_mlx import tokenizer

    cached = functools.lru_cache(maxsize=None)(tokenizer.read_hf_tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer, "read_hf_tokenizer", lambda folder: cached(Path(folder)))
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("folders") / "tiny", tokenizer="qwen3-4b")


def copy_of(model_dir: Path, target: Path) -> Path:
    """A fresh copy of the module's checkpoint to break."""
    import shutil

    return Path(shutil.copytree(model_dir, target))


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "--debug" not in lines[0]  # a known problem, not an unexpected exception
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", ["info", "prompt"])
def test_absurd_layer_count(model_dir: Path, tmp_path: Path, command: str) -> None:
    broken = copy_of(model_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 10_000_000
    (broken / "config.json").write_text(json.dumps(config))
    args = ["info", str(broken)] if command == "info" else ["prompt", "hi", "-m", str(broken)]
    assert_one_error(invoke(*args), "config.json", "num_hidden_layers", "10,000,000")


@pytest.mark.parametrize("command", ["info", "prompt"])
def test_config_field_of_the_wrong_type(model_dir: Path, tmp_path: Path, command: str) -> None:
    broken = copy_of(model_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["rms_norm_eps"] = "1e-6"
    (broken / "config.json").write_text(json.dumps(config))
    args = ["info", str(broken)] if command == "info" else ["prompt", "hi", "-m", str(broken)]
    assert_one_error(invoke(*args), "config.json", "rms_norm_eps", "must be a number")


def test_info_json_checks_every_tensor(model_dir: Path, tmp_path: Path) -> None:
    """A folder missing one tensor was reported as fine by `info --json`; prompt refused it."""
    broken = copy_of(model_dir, tmp_path / "broken")
    weights = read_safetensors(broken)
    weights.pop("model.layers.1.self_attn.k_norm.weight")
    (broken / "model.safetensors").unlink()
    save_weights(broken, weights)
    for args in (["info", str(broken), "--json"], ["prompt", "hi", "-m", str(broken)]):
        assert_one_error(invoke(*args), "model.layers.1.self_attn.k_norm.weight", "missing")


def test_info_json_is_the_library_record(model_dir: Path) -> None:
    from qwen3_mlx.model_facts import describe_model

    result = invoke("info", str(model_dir), "--json")
    assert result.exit_code == 0, result.stderr
    shown, record = json.loads(result.stdout), describe_model(str(model_dir)).as_dict()
    for facts in (shown, record):  # free memory moves between two calls
        assert facts.pop("kv_tokens_in_free_memory") is not None
    assert shown == record
    assert "4 query / 2 key-value heads" in invoke("info", str(model_dir)).stdout


@pytest.mark.parametrize("command", ["info", "prompt"])
def test_a_mistyped_relative_path_is_a_missing_folder_for_both(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from qwen3_mlx import hub

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "cached_snapshot", lambda *a, **k: pytest.fail("asked the cache"))
    monkeypatch.setattr(hub, "fetch_small_files", lambda *a, **k: pytest.fail("asked the Hub"))
    args = ["info", "models/typo"] if command == "info" else ["prompt", "hi", "-m", "models/typo"]
    assert_one_error(invoke(*args), "models/typo: no such model folder", "./models exists")


# --- a Hub that accepts connections and never answers -----------------------------------------


@pytest.fixture
def stalled_hub() -> Iterator[str]:
    """http://127.0.0.1:PORT: accepts every connection, reads nothing, answers nothing.

    After two minutes it hangs up on everyone, so that code without timeouts fails the test
    instead of hanging the suite.
    """
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hang_up() -> None:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone does not
        server.close()
        for connection in held:
            connection.close()

    safety = threading.Timer(120, hang_up)
    safety.start()

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    safety.cancel()
    hang_up()


def test_a_stalled_hub_is_one_clear_error_for_info(stalled_hub: str, tmp_path: Path) -> None:
    """huggingface_hub reads its endpoint and timeouts at import: a subprocess gets them from
    the environment, as a user would set them. The subprocess's own limit only keeps a
    regression from hanging the suite."""
    env = {
        **os.environ,
        "HF_ENDPOINT": stalled_hub,
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HOME": str(tmp_path / "home"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-m", "qwen3_mlx", "info", "owner/repo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    for fragment in ("owner/repo", stalled_hub, "did not answer within 1 s", "HF_HUB_"):
        assert fragment in lines[0], lines[0]


def test_a_stalled_hub_is_one_clear_error_for_prompt(
    stalled_hub: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process (prompt's start-up imports take seconds): the two settings huggingface_hub
    read from HF_ENDPOINT and HF_HUB_DOWNLOAD_TIMEOUT at import are set as they would be."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", stalled_hub)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert_one_error(
        invoke("prompt", "hi", "-m", "owner/repo"),
        "owner/repo: download failed",
        stalled_hub,
        "did not answer within 1 s",
    )
