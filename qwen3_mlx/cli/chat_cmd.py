"""`qwen3-mlx chat`: the interactive chat."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from qwen3_mlx import __version__
from qwen3_mlx.cli import options as o
from qwen3_mlx.cli.distributed_run import distributed_command
from qwen3_mlx.cli.guard import reported_errors, stop_on_signals
from qwen3_mlx.cli.transcript_files import load_path
from qwen3_mlx.cli.user_config import history_path
from qwen3_mlx.transcript import read_transcript, user_path


@o.with_session_options
@distributed_command
def chat_command(
    ctx: typer.Context,
    session: o.SessionOptions,
    load: Annotated[
        Path | None,
        typer.Option(
            "--load",
            dir_okay=False,
            metavar="FILE",
            help="Continue the conversation saved in FILE (a /save transcript; its KV cache too "
            "when saved with it).",
        ),
    ] = None,
) -> None:
    """Chat with a model in the terminal (type /help inside for the commands)."""
    with reported_errors(ctx), stop_on_signals():
        spec = session.spec(ctx)
        if load is not None:
            load = load_path(user_path(load))
            if not load.is_file():
                raise typer.BadParameter(f"{load}: no such file", param_hint="--load")
            read_transcript(load)  # a missing or damaged file fails before the model loads
        if sys.stdin is None or sys.stdin.closed:
            raise typer.BadParameter(
                "it is closed; chat reads from a terminal or a pipe", param_hint="stdin"
            )
        from rich.console import Console

        from qwen3_mlx.cli.line_input import pipe_reader, terminal_reader
        from qwen3_mlx.cli.loading_status import loading
        from qwen3_mlx.cli.render import print_header
        from qwen3_mlx.cli.repl import Repl
        from qwen3_mlx.cli.tool_steps import open_tool_session, stderr_asker, terminal_asker

        # The servers start while the model loads; both can take seconds.
        tools = open_tool_session(spec)
        try:
            with loading(spec.model):
                chat = spec.open_chat()
            for problem in tools.wait_started(chat) if tools is not None else []:
                print(f"Warning: {problem}", file=sys.stderr, flush=True)
            console = Console(highlight=False)
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
            if interactive:
                summary = tools.summary() if tools is not None else None
                print_header(console, chat, __version__, tools=summary)
            reader = terminal_reader(history_path()) if interactive else pipe_reader()
            # Consent comes from a person at a terminal, never from piped data: with stdin a
            # pipe there is no question, and calls run only as --yes or mcp_allow permit.
            ask_line = None
            if tools is not None and sys.stdin.isatty():
                ask_line = terminal_asker() if interactive else stderr_asker(reader)
            repl = Repl(
                chat,
                console,
                reader,
                show_thinking=spec.show_thinking,
                tools=tools,
                ask_line=ask_line,
            )
            if load is not None:
                repl.load(load)
            repl.run()
        finally:
            if tools is not None:
                tools.manager.close()
