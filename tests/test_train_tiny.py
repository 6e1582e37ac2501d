"""tiny_model/train_tiny.py: a fixed seed gives the same checkpoint, and the export is a plain Qwen3
folder our loader reads. A few steps only; the full recipe is documented in models/README.md."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "tiny_model" / "train_tiny.py"


def train(out: Path, seed: int) -> str:
    """Run three training steps into `out`; return the sha256 of the weights."""
    subprocess.run(
        [sys.executable, str(TRAIN), "--steps", "3", "--seed", str(seed), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_and_a_loadable_export(tmp_path):
    pytest.importorskip("torch")
    first = train(tmp_path / "a", seed=0)
    assert train(tmp_path / "b", seed=0) == first
    assert train(tmp_path / "c", seed=1) != first

    from qwen3_mlx.loading import load

    folder = tmp_path / "a"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is True
    model, tokenizer, generation = load(folder)
    assert model.args.vocab_size == 151936 and model.args.num_key_value_heads == 2
    assert tokenizer.encode("<think>") == [151667]
    assert generation.eos_token_ids == (151645, 151643)
    # The shipped files are exactly the committed model's (same tokenizer and template).
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (folder / name).read_bytes() == (REPO / "models/qwen3-tiny-chat" / name).read_bytes()
