"""`qwen3-mlx quantize`: a thin view over the `quantize` package (progress bar, summary, errors)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qwen3_mlx.cli.guard import (
    EXIT_INTERRUPT,
    EXIT_USAGE,
    error_line,
    reported_errors,
    stop_on_signals,
)
from qwen3_mlx.sizes import format_size

if TYPE_CHECKING:
    from qwen3_mlx.quantize import ConversionProgress, ConversionResult, VerifyReport

SourceArgument = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        show_default=False,
        help="Model folder or Hugging Face repo id: bf16/fp16/fp32 safetensors, or Qwen's FP8.",
    ),
]
OutputArgument = Annotated[
    Path,
    typer.Argument(metavar="OUTPUT", show_default=False, help="Folder to create (MLX layout)."),
]
BitsOption = Annotated[
    int | None,
    typer.Option(
        "--bits", "-b", show_default=False, help="Bits per weight: 2, 3, 4, 5, 6 or 8 [default: 4]."
    ),
]
GroupSizeOption = Annotated[
    int,
    typer.Option("--group-size", "-g", help="Weights sharing one scale and bias: 32, 64 or 128."),
]
RecipeOption = Annotated[
    str,
    typer.Option(
        "--recipe",
        help="uniform (every layer at --bits), or mixed_4_6 (6 bits for v_proj and down_proj in the "
        "first and last eighth of the layers and for the output embedding, 4 bits elsewhere).",
    ),
]
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="dtype of scales, biases and unquantized tensors: bfloat16, float16, float32.",
    ),
]
ShardOption = Annotated[
    str,
    typer.Option(
        "--max-shard-size", metavar="SIZE", help="Largest weight file, like 5GB or 500MB."
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")]
VerifyOption = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Afterwards, compare source and result on fixed prompts (KL divergence, top-1 agreement).",
    ),
]


def quantize_command(
    ctx: typer.Context,
    source: SourceArgument,
    output: OutputArgument,
    bits: BitsOption = None,
    group_size: GroupSizeOption = 64,
    recipe: RecipeOption = "uniform",
    dtype: DtypeOption = "bfloat16",
    max_shard_size: ShardOption = "5GB",
    force: ForceOption = False,
    verify: VerifyOption = False,
) -> None:
    """Convert a Qwen3 checkpoint into an MLX quantized model folder (mlx-lm and LM Studio load it too)."""
    spec, shard_bytes = _parse_options(bits, group_size, recipe, dtype, max_shard_size)
    with reported_errors(ctx), _interrupt_line(output):
        from qwen3_mlx.quantize import quantize_checkpoint, verify_quantized

        with _progress_bar() as on_progress:
            result = quantize_checkpoint(
                source,
                output,
                spec=spec,
                dtype=dtype,
                max_shard_size=shard_bytes,
                force=force,
                progress=on_progress,
                download_progress=True,
            )
        for line in summary_lines(result):
            print(line)
        if verify:
            print(verify_line(verify_quantized(result.source, result.output)))


def _parse_options(
    bits: int | None, group_size: int, recipe: str, dtype: str, max_shard_size: str
) -> tuple[Any, int]:
    """Check option values before any work; a bad one is a usage error (exit 2)."""
    from qwen3_mlx.errors import Qwen3Error
    from qwen3_mlx.quant import QuantSpec

    try:
        if recipe == "mixed_4_6" and bits not in (None, 4):
            raise ValueError("--recipe mixed_4_6 sets the bits itself (4 and 6); leave out --bits")
        from qwen3_mlx.dtypes import COMPUTE_DTYPES

        if dtype not in COMPUTE_DTYPES:
            names = ", ".join(COMPUTE_DTYPES)
            raise ValueError(f"unknown dtype {dtype!r}: choose one of {names}")
        from qwen3_mlx.quantize.plan import parse_size

        return QuantSpec(
            bits=4 if bits is None else bits, group_size=group_size, recipe=recipe
        ), parse_size(max_shard_size)
    except (Qwen3Error, ValueError) as error:
        error_line(str(error))
        raise typer.Exit(EXIT_USAGE) from None


class _Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where Python was when it came, so every cleanup on the way runs.

    A BaseException like KeyboardInterrupt: no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _interrupt_line(output: Path) -> Iterator[None]:
    """Ctrl-C, SIGTERM, SIGHUP: one `Error:` line (the library already removed its partial folder).

    Exit 130 for Ctrl-C, and 128 + the signal number for the others (143, 129), as a shell reports
    a process that a signal ended.
    """
    try:
        with stop_on_signals(_Stopped):
            yield
    except KeyboardInterrupt:
        _quiet_error_line(f"interrupted; {output} was not written")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        _quiet_error_line(f"stopped by {name}; {output} was not written")
        raise typer.Exit(128 + stopped.signum) from None


def _quiet_error_line(message: str) -> None:
    """error_line, except that a closed terminal (SIGHUP's usual cause) must not turn into a crash."""
    try:
        error_line(message)
    except OSError:
        pass


@contextmanager
def _progress_bar() -> Iterator[Any]:
    """A rich progress bar over bytes and tensors on stderr (only on a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("Quantizing"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[tensors]} tensors"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task("quantize", total=None, tensors="0/?")

    def on_progress(event: ConversionProgress) -> None:
        bar.update(
            task,
            completed=event.bytes_done,
            total=event.bytes_total,
            tensors=f"{event.tensors_done}/{event.tensors_total}",
        )

    with bar:
        yield on_progress


def summary_lines(result: ConversionResult) -> list[str]:
    """What was written: where, how, size before and after, bits per weight, time."""
    spec = result.spec
    how = "mixed 4/6-bit (mixed_4_6)" if spec.recipe == "mixed_4_6" else f"{spec.bits}-bit"
    shards = f"{result.shards} shard{'s' if result.shards != 1 else ''}"
    return [
        f"Wrote {result.output} ({shards}, {result.tensors} tensors)",
        f"  quantization  {how}, group size {spec.group_size}, {result.dtype} scales and norms",
        f"  size          {format_size(result.source_bytes)} -> {format_size(result.output_bytes)} "
        f"({result.bits_per_weight:.2f} bits per weight)",
        f"  time          {result.seconds:.1f} s",
    ]


def verify_line(report: VerifyReport) -> str:
    """The quality check as one line."""
    prompts = (
        "chat-template prompts" if report.templated else "fixed token sequences (no tokenizer)"
    )
    return (
        f"  verify        mean KL {report.mean_kl:.4f} nats, top-1 agreement {report.top1_agreement:.1%} "
        f"over {report.positions} positions ({report.prompts} {prompts})"
    )
