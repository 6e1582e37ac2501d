"""`qwen3-mlx info` and `qwen3-mlx download`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qwen3_mlx.cli import options as o
from qwen3_mlx.cli.guard import reported_errors
from qwen3_mlx.cli.user_config import resolve_model

if TYPE_CHECKING:
    from qwen3_mlx.model_facts import ModelFacts

InfoJsonOption = Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")]


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _quantization_text(summary: dict[str, Any] | None, checkpoint_dtype: str | None) -> str:
    if summary is None:
        return f"none ({checkpoint_dtype or 'full precision'})"
    if summary["method"] == "fp8":
        return f"FP8 e4m3, {summary['block'][0]}x{summary['block'][1]} blocks (dequantized on load)"
    overrides = summary["overrides"]
    plural = "s" if overrides != 1 else ""
    return (
        f"{summary['bits']}-bit, group size {summary['group_size']}, "
        f"{overrides} per-module override{plural}"
    )


def _settings_text(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in values.items())


def _kv_text(facts: ModelFacts) -> str:
    """'147.5 kB a token as float32, 41.5 kB with --kv-bits 8, ...; N tokens fit in free memory'."""
    from qwen3_mlx.sizes import format_size

    def label(name: str) -> str:
        return f"with --kv-bits {name}" if name in ("8", "4") else f"as {name}"

    sizes = facts.kv_bytes_per_token
    text = ", ".join(f"{format_size(size)} {label(name)}" for name, size in sizes.items())
    text = text.replace(" as", " a token as", 1)
    fit = facts.kv_tokens_in_free_memory
    if fit:
        counts = ", ".join(f"{count:,} tokens {label(name)}" for name, count in fit.items())
        text += f"; free memory beside the weights holds {counts}"
    return text


def info_lines(facts: ModelFacts, extra: list[tuple[str, str]] | None = None) -> list[str]:
    """The facts of describe_model() as aligned `label  value` lines (extra rows last)."""
    from qwen3_mlx.sizes import format_size

    thinking, defaults = facts.thinking, facts.generation_defaults
    context = f"{facts.context_length:,} tokens"
    if facts.context_length_yarn:
        context += (
            f" ({facts.context_length_yarn:,} with --rope-scaling yarn "
            f"--rope-factor {facts.yarn_factor:g})"
        )
    parameters = f"{facts.parameters:,}"
    if facts.parameters >= 1e8:
        parameters = f"{facts.parameters / 1e9:.2f} B ({parameters})"
    rows = [
        ("model", facts.model),
        ("folder", facts.path or "not downloaded (files and tensor headers read from the Hub)"),
        (
            "architecture",
            f"{facts.architecture}: {facts.layers} layers, hidden {facts.hidden_size}, "
            f"{facts.attention_heads} query / {facts.key_value_heads} key-value heads, "
            f"vocab {facts.vocab_size:,}",
        ),
        ("parameters", parameters),
        ("quantization", _quantization_text(facts.quantization, facts.checkpoint_dtype)),
        (
            "weights",
            f"{format_size(facts.weights_bytes_on_disk)} on disk, "
            f"{format_size(facts.weights_bytes_in_memory)} in memory as {facts.compute_dtype}",
        ),
        *([("CPU kernels", facts.cpu_kernels)] if facts.cpu_kernels else []),
        ("context", context),
        ("KV cache", _kv_text(facts)),
        (
            "thinking switch",
            f"hard (enable_thinking): {_yes_no(thinking.hard_switch)} · "
            f"soft (/think, /no_think): {_yes_no(thinking.soft_switch)} · "
            f"prompt opens <think>: {_yes_no(thinking.prompt_opens_think)}",
        ),
        ("sampling", f"thinking: {_settings_text(defaults.thinking)}"),
    ]
    if defaults.non_thinking:
        rows.append(("", f"non-thinking: {_settings_text(defaults.non_thinking)}"))
    rows.append(("stop tokens", ", ".join(str(i) for i in defaults.eos_token_ids)))
    rows += extra or []
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


InfoDraftOption = Annotated[
    str | None,
    typer.Option(
        "--draft-model",
        metavar="PATH|REPO",
        show_default=False,
        help="Also say whether this model can draft for it (speculative decoding: the same "
        "tokenizer and vocabulary).",
    ),
]


def draft_line(model: str, draft: str) -> tuple[str, bool]:
    """The info row about a draft model, and whether it can draft (tokenizers are read)."""
    from qwen3_mlx.drafting import draft_compatibility
    from qwen3_mlx.loading import resolve_model_path

    problem = draft_compatibility(resolve_model_path(model), draft)
    if problem is None:
        return f"{draft}: compatible (the same tokenizer and vocabulary)", True
    return f"{draft}: not compatible, {problem}", False


def info_command(
    ctx: typer.Context,
    model: o.ModelArgument = None,
    json_output: InfoJsonOption = False,
    compute_dtype: o.ComputeDtypeOption = o.ComputeDtype.auto,
    draft_model: InfoDraftOption = None,
) -> None:
    """Describe a model from its files: size, quantization, memory, context, thinking switches."""
    with reported_errors(ctx):
        from qwen3_mlx.model_facts import describe_model

        name = resolve_model(model)
        facts = describe_model(name, compute_dtype=compute_dtype.value)
        draft = draft_line(name, draft_model) if draft_model is not None else None
        if json_output:
            body = facts.as_dict()
            if draft is not None:
                body["draft"] = {"model": draft_model, "compatible": draft[1], "text": draft[0]}
            print(json.dumps(body, indent=2))
        else:
            print("\n".join(info_lines(facts, [("draft", draft[0])] if draft else None)))


def download_command(ctx: typer.Context, model: o.ModelArgument = None) -> None:
    """Fetch a model into the Hugging Face cache (with a progress bar) and print its folder."""
    with reported_errors(ctx):
        from qwen3_mlx.hub import download_model, is_repo_id

        repo = resolve_model(model)
        if Path(repo).expanduser().exists():
            raise typer.BadParameter(
                f"{repo} is a local folder; download takes a Hugging Face repo id"
            )
        if not is_repo_id(repo):
            raise typer.BadParameter(
                f"{repo!r} is not a Hugging Face repo id 'owner/name' (letters, digits, '-', '_' "
                "and '.' on each side)"
            )
        print(download_model(repo, progress=True))
