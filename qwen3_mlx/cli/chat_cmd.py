"""`qwen3-mlx chat`: the interactive chat."""

from __future__ import annotations

import sys

import typer

from qwen3_mlx import __version__
from qwen3_mlx.cli import options as o
from qwen3_mlx.cli.guard import reported_errors
from qwen3_mlx.cli.user_config import history_path, resolve_model


def chat_command(
    ctx: typer.Context,
    model: o.ModelOption = None,
    no_think: o.NoThinkOption = False,
    system: o.SystemOption = None,
    system_file: o.SystemFileOption = None,
    show_thinking: o.ShowThinkingOption = False,
    temp: o.TempOption = None,
    top_p: o.TopPOption = None,
    top_k: o.TopKOption = None,
    min_p: o.MinPOption = None,
    presence_penalty: o.PresencePenaltyOption = None,
    seed: o.SeedOption = None,
    max_tokens: o.MaxTokensOption = None,
    rope_scaling: o.RopeScalingOption = None,
    rope_factor: o.RopeFactorOption = None,
    compute_dtype: o.ComputeDtypeOption = o.ComputeDtype.auto,
) -> None:
    """Chat with a model in the terminal (type /help inside for the commands)."""
    with reported_errors(ctx):
        rope = o.rope_scaling_block(rope_scaling, rope_factor)
        system_text = o.system_prompt(system, system_file)
        from rich.console import Console

        from qwen3_mlx.cli.line_input import pipe_reader, terminal_reader
        from qwen3_mlx.cli.loading_status import loading
        from qwen3_mlx.cli.render import print_header
        from qwen3_mlx.cli.repl import Repl

        spec = o.SessionSpec(
            model=resolve_model(model),
            thinking=not no_think,
            system=system_text,
            sampling=o.sampling_overrides(
                temperature=temp,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                presence_penalty=presence_penalty,
                seed=seed,
                max_tokens=max_tokens,
            ),
            rope_scaling=rope,
            compute_dtype=compute_dtype.value,
        )
        with loading(spec.model):
            chat = spec.open_chat()
        console = Console(highlight=False)
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        if interactive:
            print_header(console, chat, __version__)
        reader = terminal_reader(history_path()) if interactive else pipe_reader()
        Repl(chat, console, reader, show_thinking=show_thinking).run()
