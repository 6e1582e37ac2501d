"""Train the tiny Qwen3 chat model used as the end-to-end fixture and offline demo.

    /work/venv/bin/python tools/train_tiny.py            # full run, writes models/qwen3-tiny-chat/
    /work/venv/bin/python tools/train_tiny.py --steps 20 --out /tmp/trial   # speed trial

Same seed and step count give the same weights (torch on CPU with a fixed thread count). The
model is a real Qwen3 (transformers Qwen3ForCausalLM) with tied embeddings over the full
151,936-token vocabulary; only the hidden width and depth are tiny.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_data  # noqa: E402

DEFAULT_OUT = tiny_data.REPO_ROOT / "models" / "qwen3-tiny-chat"

# Shapes follow the real Qwen3 config layout; only the sizes shrink. hidden 64 keeps the
# 151,936-row embedding at 19.4 MB in bfloat16.
MODEL_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "max_position_embeddings": 40960,
    "max_window_layers": 6,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

TOKENIZER_FILES = (
    ("tokenizer", "tokenizer.json"),
    ("tokenizer", "merges.txt"),
    ("tokenizer", "vocab.json"),
    ("qwen3-4b", "tokenizer_config.json"),
    ("qwen3-4b", "chat_template.jinja"),
    ("qwen3-4b", "generation_config.json"),
)


def copy_tokenizer_files(out: Path, source: Path = tiny_data.SHARED_QWEN3) -> None:
    """Copy the real Qwen3 tokenizer, chat template and generation config into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for folder, name in TOKENIZER_FILES:
        shutil.copyfile(source / folder / name, out / name)


def build_batch(tokenizer, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids plus (row, position) of every hidden state that predicts a reply token."""
    encoded = [tiny_data.encode_example(tokenizer, tiny_data.sample_training_example(rng)) for _ in range(batch_size)]
    length = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((batch_size, length), tiny_data.ENDOFTEXT_ID, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (prompt, completion) in enumerate(encoded):
        sequence = prompt + completion
        ids[row, : len(sequence)] = torch.tensor(sequence)
        # Causal attention: right padding never reaches a real token, so no mask is needed.
        for offset, token in enumerate(completion):
            rows.append(row)
            positions.append(len(prompt) + offset - 1)
            targets.append(token)
    return ids, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets)


def reply_loss(model: Qwen3ForCausalLM, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy on assistant-reply tokens only, over the full tied vocabulary."""
    ids, rows, positions, targets = batch
    hidden = model.model(input_ids=ids).last_hidden_state  # (B, L, D), final norm applied
    selected = hidden[rows, positions]  # (N, D): only these need the 151,936-wide lm head
    logits = selected @ model.model.embed_tokens.weight.T  # (N, V)
    return torch.nn.functional.cross_entropy(logits, targets)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> Qwen3ForCausalLM:
    """Train from scratch and return the float32 model."""
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = Qwen3Config(**{k: v for k, v in MODEL_CONFIG.items() if k != "torch_dtype"})
    model = Qwen3ForCausalLM(config).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    started = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = reply_loss(model, build_batch(tokenizer, rng, args.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - started
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed:7.1f}s", flush=True)
    return model


def export(model: Qwen3ForCausalLM, out: Path) -> None:
    """Write a plain Hugging Face Qwen3 checkpoint: bf16 safetensors (tied), config, tokenizer."""
    copy_tokenizer_files(out)
    tensors = {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    """Command-line options; defaults are the committed model's recipe."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with tokenizer files")
    return parser.parse_args()


def main() -> None:
    """Train, then export to --out."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.tokenizer is None:
        copy_tokenizer_files(args.out)
        args.tokenizer = args.out
    started = time.time()
    model = train(args)
    export(model, args.out)
    print(f"wrote {args.out} after {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
