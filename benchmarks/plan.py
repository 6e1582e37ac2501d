"""What the suite measures: the worker runs (one process each) and the comparisons built from them.

Engine set-ups:
  ours        qwen3-mlx's defaults (compute dtype auto = float32 on the CPU backend, quantized
              matmuls split over cores, GEMM prefill with OpenBLAS, OpenBLAS when installed)
  ours-bf16   qwen3-mlx forced to bfloat16 activations (same dtype as mlx-lm's default)
  mlx         mlx-lm as a user gets it: checkpoint dtype (bfloat16), the wheel's reference BLAS
  mlx-f32     mlx-lm cast to float32 in the same environment as ours (OpenBLAS preloaded too):
              the same-dtype, same-BLAS comparison
  ours-1thread, ours-noblas   ours without one of its optimisations, to show each

mlx-lm's CPU prefill runs the quantized kernel one prompt row at a time, so its rate does not
depend on the prompt length; where a full-length run would take tens of minutes its prompt is
shorter, and the table says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SETUPS: dict[str, dict[str, Any]] = {
    "ours": {"engine": "ours", "dtype": "auto", "openblas": True},
    "ours-1thread": {"engine": "ours_1thread", "dtype": "auto", "openblas": True},
    "ours-bf16": {"engine": "ours", "dtype": "bfloat16", "openblas": True},
    "ours-noblas": {"engine": "ours", "dtype": "auto", "openblas": False},
    "mlx": {"engine": "mlx_lm", "dtype": "checkpoint", "openblas": False},
    "mlx-f32": {"engine": "mlx_lm", "dtype": "float32", "openblas": True},
}

MODELS = {"0.6b-4bit": ("0.6b", 4), "0.6b-bf16": ("0.6b", None), "4b-4bit": ("4b", 4)}


@dataclass(frozen=True)
class Comparison:
    """One table row: a metric of ours against theirs (run ids), with a note on conditions."""

    group: str
    label: str
    metric: str  # tok_s (higher is better), ttft / load_s / peak_gb (lower is better)
    ours: str
    theirs: str
    note: str = ""


@dataclass
class Plan:
    """Worker specs by id, and the comparisons over them."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    chats: dict[str, str] = field(default_factory=dict)  # approach name -> chat run id

    def run(self, setup: str, model: str, task: str, **params: Any) -> str:
        """Register a worker run; return its id."""
        shape, bits = MODELS[model]
        suffix = "-".join(
            f"{k}{v}" for k, v in sorted(params.items()) if k not in ("measured", "once")
        )
        run_id = f"{task}/{model}/{setup}" + (f"/{suffix}" if suffix else "")
        self.runs[run_id] = {
            "setup": setup,
            "model": model,
            "task": task,
            "shape": shape,
            "bits": bits,
            **SETUPS[setup],
            **params,
        }
        return run_id

    def compare(
        self, group: str, label: str, metric: str, ours: str, theirs: str, note: str = ""
    ) -> None:
        """Add a table row."""
        self.comparisons.append(Comparison(group, label, metric, ours, theirs, note))


def decode_rows(plan: Plan, model: str, tokens: int, slow_tokens: int) -> None:
    """Decode tok/s: same dtype, then mlx-lm's default against our default policy; load and memory."""
    ours = plan.run("ours", model, "decode", tokens=tokens)
    f32 = plan.run("mlx-f32", model, "decode", tokens=tokens)
    default = plan.run("mlx", model, "decode", tokens=slow_tokens, once=True)
    plan.compare("decode", f"{model} float32 vs float32", "tok_s", ours, f32)
    policy = "policy: float32 vs bf16"
    plan.compare(
        "decode", f"{model} ours default vs mlx-lm default", "tok_s", ours, default, policy
    )
    for metric in ("load_s", "peak_gb"):
        plan.compare(metric, f"{model} ours default vs mlx-lm default", metric, ours, default)
    plan.compare("peak_gb", f"{model} float32 vs float32", "peak_gb", ours, f32)


def variant_rows(plan: Plan, model: str, tokens: int) -> None:
    """Ours with decode on one thread."""
    ours = plan.run("ours", model, "decode", tokens=tokens)
    one_thread = plan.run("ours-1thread", model, "decode", tokens=tokens)
    label = f"{model} decode, split over cores vs one thread"
    plan.compare("threads", label, "tok_s", ours, one_thread)


def build_plan(quick: bool) -> Plan:
    """The full suite, or --quick: the 0.6B 4-bit model only, fewer tokens and turns."""
    plan = Plan()
    tokens, slow = (8, 3) if quick else (16, 6)
    decode_rows(plan, "0.6b-4bit", tokens, slow)
    same = plan.run("ours-bf16", "0.6b-4bit", "decode", tokens=slow, once=True)
    default = plan.run("mlx", "0.6b-4bit", "decode", tokens=slow, once=True)
    plan.compare("decode", "0.6b-4bit bf16 vs bf16", "tok_s", same, default)
    variant_rows(plan, "0.6b-4bit", tokens)
    if not quick:
        decode_rows(plan, "0.6b-bf16", tokens, slow)
        decode_rows(plan, "4b-4bit", 6, 3)
        variant_rows(plan, "4b-4bit", 6)
    prefill_rows(plan, quick)
    chat_rows(plan, quick)
    return plan


def prefill_rows(plan: Plan, quick: bool) -> None:
    """Prefill tok/s at 512 and 2,048 prompt tokens (row-at-a-time paths at shorter prompts)."""
    lengths = [512] if quick else [512, 2048]
    short_f32, short_bf16 = (32, 8) if quick else (64, 16)
    mlx_f32 = plan.run("mlx-f32", "0.6b-4bit", "prefill", prompt=short_f32)
    mlx_default = plan.run("mlx", "0.6b-4bit", "prefill", prompt=short_bf16, once=True)
    for length in lengths:
        ours = plan.run("ours", "0.6b-4bit", "prefill", prompt=length)
        note = f"mlx-lm at {short_f32} tokens"
        plan.compare(
            "prefill", f"0.6b-4bit {length} float32 vs float32", "tok_s", ours, mlx_f32, note
        )
        note = f"mlx-lm at {short_bf16} tokens"
        plan.compare(
            "prefill",
            f"0.6b-4bit {length} ours default vs mlx-lm default",
            "tok_s",
            ours,
            mlx_default,
            note,
        )
    ours = plan.run("ours", "0.6b-4bit", "prefill", prompt=512)
    without = plan.run("ours-noblas", "0.6b-4bit", "prefill", prompt=short_f32, once=True)
    note = f"without OpenBLAS at {short_f32} tokens"
    plan.compare(
        "openblas", "0.6b-4bit prefill 512, OpenBLAS vs none", "tok_s", ours, without, note
    )
    if quick:
        return
    for length in lengths:
        ours = plan.run("ours", "0.6b-bf16", "prefill", prompt=length)
        theirs = plan.run("mlx-f32", "0.6b-bf16", "prefill", prompt=length)
        plan.compare(
            "prefill",
            f"0.6b-bf16 {length} float32 vs float32 (both OpenBLAS)",
            "tok_s",
            ours,
            theirs,
        )
    ours = plan.run("ours", "0.6b-bf16", "prefill", prompt=512)
    note = "mlx-lm at 128 tokens"
    theirs = plan.run("mlx", "0.6b-bf16", "prefill", prompt=128, once=True)
    plan.compare(
        "prefill", "0.6b-bf16 512 ours default vs mlx-lm default", "tok_s", ours, theirs, note
    )
    without = plan.run("ours-noblas", "0.6b-bf16", "prefill", prompt=128, once=True)
    note = "without OpenBLAS at 128 tokens"
    plan.compare(
        "openblas", "0.6b-bf16 prefill 512, OpenBLAS vs none", "tok_s", ours, without, note
    )


def chat_rows(plan: Plan, quick: bool) -> None:
    """TTFT per turn of the 8-turn thinking conversation (0.6B 4-bit, float32 on both sides)."""
    measured = [1, 8] if quick else [1, 2, 4, 8]
    ours = plan.run("ours", "0.6b-4bit", "chat", turns=8)
    stripped = plan.run(
        "mlx-f32", "0.6b-4bit", "chat", turns=8, mode="stripped", measured=measured, once=True
    )
    kept = plan.run("mlx-f32", "0.6b-4bit", "chat", turns=8, mode="kept")
    plan.chats = {
        "qwen3-mlx (cache reuse)": ours,
        "mlx-lm re-prefill (think-stripped)": stripped,
        "mlx-lm chat (thinking kept)": kept,
    }
    for turn in (1, 8):
        pairs = (("mlx-lm re-prefill", stripped), ("mlx-lm chat (thinking kept)", kept))
        for name, theirs in pairs:
            plan.compare(
                "ttft",
                f"turn {turn}: ours (cache reuse) vs {name}",
                "ttft",
                f"{ours}#{turn}",
                f"{theirs}#{turn}",
            )
