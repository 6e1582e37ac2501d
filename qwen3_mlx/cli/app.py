"""The `qwen3-mlx` Typer app: global options and the list of commands.

Commands import MLX, transformers and the model code inside their functions, so `--help` and
`--version` stay fast.
"""

from __future__ import annotations

import platform
import sys
from typing import Annotated

import typer

from qwen3_mlx import __version__
from qwen3_mlx.cli.chat_cmd import chat_command
from qwen3_mlx.cli.info_cmd import download_command, info_command
from qwen3_mlx.cli.prompt_cmd import prompt_command
from qwen3_mlx.cli.quantize_cmd import quantize_command
from qwen3_mlx.cli.serve_cmd import serve_command

app = typer.Typer(
    name="qwen3-mlx",
    help="Chat with Qwen3 models on Apple silicon, with MLX.\n\n"
    "The model comes from --model, else $QWEN3_MLX_MODEL, else `model` in "
    "$XDG_CONFIG_HOME/qwen3-mlx/config.toml, else Qwen/Qwen3-4B-MLX-4bit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain Click formatting: usage errors end in one `Error: ...` line, like runtime errors.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"qwen3-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Chat with Qwen3 models on Apple silicon, with MLX."""
    ctx.obj = {"debug": debug}
    if debug:
        _note_native_kernel()


def _note_native_kernel() -> None:
    """Under --debug, one line when the native 4-bit CPU kernel was built for this platform but
    is not in use (mx.quantized_matmul serves instead)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    from qwen3_mlx.cpu.native import fallback_reason

    reason = fallback_reason()
    if reason:
        print(f"Warning: native 4-bit kernel not used: {reason}", file=sys.stderr, flush=True)


app.command("chat")(chat_command)
app.command("prompt")(prompt_command)
app.command("download")(download_command)
app.command("info")(info_command)
app.command("quantize")(quantize_command)
app.command("serve")(serve_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="qwen3-mlx")
