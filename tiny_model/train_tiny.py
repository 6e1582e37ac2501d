"""Train the tiny Qwen3 chat model used as the end-to-end fixture and offline demo.

    python tiny_model/train_tiny.py            # full run, writes models/qwen3-tiny-chat/
    python tiny_model/train_tiny.py --steps 20 --out /tmp/trial   # speed trial
    python tiny_model/train_tiny.py --init-from FOLDER --out OUT --steps 120 --lr 3e-4 \
        --warmup 10 --final-lr 0 --dropped-reasoning 0.5        # a second, short stage

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
import tiny_tokens  # noqa: E402

DEFAULT_OUT = tiny_data.REPO_ROOT / "models" / "qwen3-tiny-chat"

# Shapes follow the real Qwen3 config layout; only the sizes shrink. hidden 64 keeps the
# 151,936-row embedding at 19.4 MB in bfloat16.
MODEL_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 64,
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

# The real Qwen3 tokenizer, current Qwen3-4B chat template and sampling defaults. vocab.json and
# merges.txt are left out: tokenizer.json already holds the vocabulary and the merges, every loader
# here reads that, and the copies would add 4.5 MB to each model folder.
TOKENIZER_FILES = (
    ("tokenizer", "tokenizer.json"),
    ("qwen3-4b", "tokenizer_config.json"),
    ("qwen3-4b", "chat_template.jinja"),
    ("qwen3-4b", "generation_config.json"),
)
# Byte-identical copies of the shared files live in the repo's test fixtures (tests/fixtures/SOURCES.md).
TOKENIZER_SOURCES = (tiny_data.REPO_ROOT / "tests" / "fixtures", tiny_data.SHARED_QWEN3)


def copy_tokenizer_files(out: Path) -> None:
    """Copy the real Qwen3 tokenizer, chat template and generation config into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for folder, name in TOKENIZER_FILES:
        source = next(
            (root / folder / name for root in TOKENIZER_SOURCES if (root / folder / name).exists()),
            None,
        )
        if source is None:
            raise SystemExit(
                f"missing {folder}/{name} in {' or '.join(map(str, TOKENIZER_SOURCES))}"
            )
        shutil.copyfile(source, out / name)


def build_batches(
    tokenizer,
    rng: random.Random,
    batch_size: int,
    stage: int,
    pool: int = 8,
    dropped_reasoning: float = 0.0,
) -> list[tuple]:
    """Draw `pool` batches' worth of examples and group them by length to cut padding."""
    encoded = [
        tiny_tokens.training_sequence(
            tokenizer, tiny_data.sample_training_example(rng, stage, dropped_reasoning)
        )
        for _ in range(batch_size * pool)
    ]
    encoded.sort(key=lambda pair: len(pair[0]))
    batches = [
        collate(encoded[start : start + batch_size]) for start in range(0, len(encoded), batch_size)
    ]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[tuple[list[int], list[tuple[int, int]]]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids plus (row, position) of every hidden state that predicts a reply token."""
    length = max(len(sequence) for sequence, _ in encoded)
    ids = torch.full((len(encoded), length), tiny_data.ENDOFTEXT_ID, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (sequence, spans) in enumerate(encoded):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        # Causal attention: right padding never reaches a real token, so no mask is needed.
        for start, end in spans:
            for position in range(start, end):
                rows.append(row)
                positions.append(position - 1)
                targets.append(sequence[position])
    return ids, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets)


def data_vocabulary(tokenizer, rng: random.Random, samples: int = 4000) -> torch.Tensor:
    """Sorted ids of every token seen in the data, prompts included (inputs are tied outputs too)."""
    seen: set[int] = set()
    for _ in range(samples):
        prompt, completion = tiny_tokens.encode_example(
            tokenizer, tiny_data.sample_training_example(rng)
        )
        seen.update(prompt)
        seen.update(completion)
    for task in (*tiny_data.TASKS, "lookup"):  # held-out questions use the same tokens; make sure
        for _ in range(50):
            tools = rng.choice(((), ("lookup", "word_count")))
            example = tiny_data.make_example(
                rng, held_out=True, task=task, tools=tools, after_result=rng.random() < 0.5
            )
            seen.update(sum(tiny_tokens.encode_example(tokenizer, example), []))
    return torch.tensor(sorted(seen))


class RowAdam:
    """AdamW for the tied embedding that updates only the rows a step used (a lazy, sparse Adam).

    A dense update touches all 151,936 rows every step and costs more than the model itself.
    """

    def __init__(self, weight: torch.Tensor, betas: tuple[float, float], weight_decay: float):
        self.weight = weight
        self.betas = betas
        self.weight_decay = weight_decay
        self.first = torch.zeros_like(weight)
        self.second = torch.zeros_like(weight)
        self.steps = 0

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor, lr: float, eps: float = 1e-8) -> None:
        """Apply one AdamW update to `rows` of the weight given their gradient."""
        self.steps += 1
        beta1, beta2 = self.betas
        first = self.first[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        second = self.second[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.first[rows], self.second[rows] = first, second
        first_hat = first / (1 - beta1**self.steps)
        second_hat = second / (1 - beta2**self.steps)
        weight = self.weight[rows]
        weight.mul_(1 - lr * self.weight_decay)
        weight.sub_(lr * first_hat / (second_hat.sqrt() + eps))
        self.weight[rows] = weight


def tie_word_variants(embedding: torch.Tensor, tokenizer, noise: float = 0.2) -> None:
    """Start "river" (reply start) near " river" (inside a prompt): same word, two tokens.

    Copying a prompt word to the start of a reply means mapping one token to the other; from
    unrelated random rows the tiny model never found that map (0 % copy accuracy after 400 steps,
    96 % when prompt and reply used the same token).
    """
    for word in tiny_data.WORDS:
        (bare,) = tokenizer.encode(word)
        (spaced,) = tokenizer.encode(" " + word)
        embedding[bare] = embedding[spaced] + noise * embedding[bare]


def reply_loss(
    model: Qwen3ForCausalLM,
    batch: tuple,
    rows: torch.Tensor,
    table: torch.Tensor,
    correction: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on assistant-reply tokens only, over a candidate subset of the tied vocabulary.

    `table` holds the embedding rows `rows` (sorted ids): every token of the data plus a fresh
    uniform sample of the others. `correction` adds log(unused rows / sampled rows) to the sampled
    logits, so their softmax mass estimates that of all never-used rows and those rows are pushed
    down as hard as a full 151,936-wide head would push them (which would cost ~4x the step).
    Returns the loss and the token accuracy.
    """
    ids, batch_rows, positions, targets = batch
    inputs = table[torch.searchsorted(rows, ids)]  # (B, L, D) input embeddings
    hidden = model.model(inputs_embeds=inputs).last_hidden_state  # (B, L, D), final norm applied
    selected = hidden[batch_rows, positions]  # (N, D): only these need the lm head
    logits = selected @ table.T + correction  # (N, C)
    labels = torch.searchsorted(rows, targets)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return torch.nn.functional.cross_entropy(logits, labels), accuracy


def learning_rate(step: int, steps: int, peak: float, warmup: int, final: float = 0.1) -> float:
    """Linear warmup, then cosine decay to `final` times the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def initial_model(args: argparse.Namespace, tokenizer) -> Qwen3ForCausalLM:
    """A fresh float32 model, or with --init-from the weights of an earlier stage's checkpoint."""
    if args.init_from is not None:
        return Qwen3ForCausalLM.from_pretrained(args.init_from, torch_dtype=torch.float32)
    config = Qwen3Config(**{k: v for k, v in model_config(args).items() if k != "torch_dtype"})
    model = Qwen3ForCausalLM(config).float()
    for name, parameter in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            # q/k RMSNorm caps attention logits at head_dim * w_q * w_k / sqrt(head_dim); a larger
            # start lets the tiny model form sharp (copying) attention patterns sooner.
            parameter.data.fill_(args.qk_norm_init)
    embedding = model.model.embed_tokens.weight
    # Qwen3's 0.02 suits a 1024+ wide embedding; at width 64 the rows would be so short that the
    # shared "a word comes next" direction the tied head learns swamps each token's identity
    # (word rows reached cosine 0.98 and the model could not copy). Keep rows ~0.8 long instead.
    torch.nn.init.normal_(embedding, std=args.embedding_init_std)
    tie_word_variants(embedding.data, tokenizer)
    return model


def train(args: argparse.Namespace) -> Qwen3ForCausalLM:
    """Train (from scratch, or on from --init-from) and return the float32 model."""
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = initial_model(args, tokenizer)
    vocab_size = model.config.vocab_size
    embedding = model.model.embed_tokens.weight
    matrices = [p for p in model.parameters() if p is not embedding and p.dim() == 2]
    norms = [p for p in model.parameters() if p.dim() == 1]
    betas = (0.9, 0.98)
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.01}, {"params": norms, "weight_decay": 0.0}],
        lr=args.lr,
        betas=betas,
    )
    backbone = matrices + norms
    embedding_optimizer = RowAdam(embedding.data, betas, weight_decay=0.01)
    vocabulary = data_vocabulary(tokenizer, rng)
    batches: list[tuple] = []
    started = time.time()
    for step in range(args.steps):
        lr = learning_rate(step, args.steps, args.lr, args.warmup, args.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if not batches:
            stage = 1 if step < args.copy_steps else 2 if step < args.tools_from else 3
            if args.init_from is not None:
                stage = 3  # a later stage keeps the whole mixture: every skill stays in training
            batches = build_batches(
                tokenizer, rng, args.batch_size, stage, dropped_reasoning=args.dropped_reasoning
            )
        batch = batches.pop()
        negatives = torch.randint(0, vocab_size, (args.negatives,), generator=generator)
        rows = torch.unique(torch.cat([vocabulary, negatives, batch[0].flatten()]))
        sampled = ~torch.isin(rows, vocabulary)
        correction = sampled * math.log((vocab_size - len(vocabulary)) / int(sampled.sum()))
        table = embedding.detach()[rows].requires_grad_()
        loss, accuracy = reply_loss(model, batch, rows, table, correction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*backbone, table], 1.0)
        optimizer.step()
        embedding_optimizer.step(rows, table.grad, lr)
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - started
            print(
                f"step {step:5d}  loss {loss.item():.4f}  token accuracy {accuracy.item():.3f}"
                f"  {elapsed:7.1f}s wall  {time.process_time():7.1f}s cpu",
                flush=True,
            )
    return model


def model_config(args: argparse.Namespace) -> dict:
    """MODEL_CONFIG with the size options of the command line applied."""
    config = dict(MODEL_CONFIG)
    config.update(
        head_dim=args.head_dim,
        num_hidden_layers=args.layers,
        max_window_layers=args.layers,
        intermediate_size=args.intermediate_size,
        rope_theta=args.rope_theta,
    )
    return config


def export(model: Qwen3ForCausalLM, config: dict, out: Path) -> None:
    """Write a plain Hugging Face Qwen3 checkpoint: bf16 safetensors (tied), config, tokenizer."""
    copy_tokenizer_files(out)
    tensors = {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults are the committed model's recipe."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1700)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument(
        "--final-lr", type=float, default=0.1, help="the cosine decays to this times --lr"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a later stage: start from this checkpoint's weights, full tool mixture throughout",
    )
    parser.add_argument(
        "--dropped-reasoning",
        type=float,
        default=0.0,
        help="share of thinking-mode tool loops whose call turn comes back without reasoning",
    )
    parser.add_argument(
        "--copy-steps", type=int, default=300, help="curriculum: copy/reverse first"
    )
    parser.add_argument(
        "--tools-from", type=int, default=700, help="curriculum: tool conversations from this step"
    )
    parser.add_argument(
        "--negatives", type=int, default=8192, help="sampled vocabulary rows per step"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"])
    parser.add_argument("--head-dim", type=int, default=MODEL_CONFIG["head_dim"])
    parser.add_argument("--intermediate-size", type=int, default=MODEL_CONFIG["intermediate_size"])
    parser.add_argument("--qk-norm-init", type=float, default=1.0)
    parser.add_argument("--embedding-init-std", type=float, default=0.1)
    parser.add_argument("--rope-theta", type=float, default=MODEL_CONFIG["rope_theta"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with tokenizer files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, then export to --out."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tokenizer is None:
        copy_tokenizer_files(args.out)
        args.tokenizer = args.out
    started = time.time()
    model = train(args)
    export(model, model_config(args), args.out)
    # With one thread, process CPU time is what the run takes on a quiet core; wall time also
    # counts the time other processes held the CPU on a shared machine.
    print(
        f"wrote {args.out} after {time.time() - started:.0f}s wall,"
        f" {time.process_time():.0f}s cpu ({args.threads} thread(s))",
        flush=True,
    )


if __name__ == "__main__":
    main()
