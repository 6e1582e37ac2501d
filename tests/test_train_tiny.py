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


def weights_hash(out: Path) -> str:
    """The sha256 of a training run's exported weights."""
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_and_a_loadable_export(tmp_path):
    """Three training steps: the script once as a user runs it, then twice in this process
    (two interpreter starts and torch imports saved)."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(TRAIN.parent))
    import train_tiny

    def argv(out: Path, seed: int) -> list[str]:
        return ["--steps", "3", "--seed", str(seed), "--out", str(out)]

    subprocess.run(
        [sys.executable, str(TRAIN), *argv(tmp_path / "a", 0)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    first = weights_hash(tmp_path / "a")
    threads = torch.get_num_threads()
    try:
        train_tiny.main(argv(tmp_path / "b", 0))
        train_tiny.main(argv(tmp_path / "c", 1))
    finally:
        torch.set_num_threads(threads)
    assert weights_hash(tmp_path / "b") == first
    assert weights_hash(tmp_path / "c") != first

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


def test_a_second_stage_starts_from_the_checkpoint_and_repeats_exactly():
    """--init-from (models/README.md's second stage): same seed, same weights, near the start."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    sys.path.insert(0, str(TRAIN.parent))
    import train_tiny

    start = REPO / "models" / "qwen3-tiny-chat"
    argv = [*("--init-from", str(start), "--tokenizer", str(start), "--steps", "2")]
    argv += [*("--batch-size", "4", "--lr", "3e-4", "--warmup", "1", "--final-lr", "0")]
    argv += ["--dropped-reasoning", "0.5"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer's default; in-process to skip two interpreter starts
    try:
        first, second = (train_tiny.train(train_tiny.parse_args(argv)).state_dict() for _ in "ab")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(first[name], second[name]) for name in first)
    initial = load_file(str(start / "model.safetensors"))
    moved = 0
    for name, weight in initial.items():
        # Two Adam steps of 3e-4 move no weight further than ~6e-4 from the checkpoint.
        assert torch.allclose(first[name], weight.float(), rtol=0, atol=1e-3), name
        moved += not torch.equal(first[name], weight.float())
    assert moved == len(initial)
