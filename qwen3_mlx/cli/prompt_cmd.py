"""`qwen3-mlx prompt`: one message in, the answer out; made for pipes and scripts."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen3_mlx.cli import options as o
from qwen3_mlx.cli.guard import EXIT_INTERRUPT, reported_errors
from qwen3_mlx.cli.user_config import resolve_model

TextArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="TEXT", show_default=False, help="The message; '-' or no TEXT reads it from stdin."
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object: thinking, answer, finish_reason, stats."),
]
TranscriptOption = Annotated[
    Path | None,
    typer.Option(
        "--transcript",
        dir_okay=False,
        metavar="FILE",
        help="Continue the conversation saved in FILE (a /save JSON transcript) and write it back "
        "with this exchange added; a missing FILE starts a new one.",
    ),
]


def read_message(text: str | None) -> str:
    """The message from the argument, or from stdin for '-' or a pipe."""
    if text is not None and text != "-":
        message = text
    elif text is None and sys.stdin.isatty():
        raise typer.BadParameter(
            "give the message as TEXT, or pipe it in on stdin", param_hint="TEXT"
        )
    else:
        message = sys.stdin.read()
    if not message.strip():
        raise typer.BadParameter("the message is empty", param_hint="TEXT")
    return message.strip("\n")


def stream_reply(events: Any, *, show_thinking: bool, collect_only: bool, shown: list[str]) -> None:
    """Write answer text to stdout as it comes (and to `shown`); thinking to stderr when asked for.

    With hidden thinking and a person at the terminal, a 'thinking…' spinner on stderr shows that
    the model is working; in pipes nothing but the answer is written.
    """
    from qwen3_mlx.events import AnswerText, ThinkingText

    thinking_open = False
    spinner = None
    watching = sys.stdout.isatty() and sys.stderr.isatty()
    try:
        for event in events:
            if isinstance(event, ThinkingText) and not collect_only:
                if show_thinking:
                    sys.stderr.write(event.text)
                    sys.stderr.flush()
                    thinking_open = True
                elif watching and spinner is None:
                    from rich.console import Console

                    spinner = Console(stderr=True).status("thinking…", spinner_style="dim")
                    spinner.start()
            elif isinstance(event, AnswerText) and not collect_only:
                if spinner is not None:
                    spinner.stop()
                if thinking_open:
                    sys.stderr.write("\n")
                    thinking_open = False
                sys.stdout.write(event.text)
                sys.stdout.flush()
                shown.append(event.text)
    finally:
        if spinner is not None:
            spinner.stop()


def result_json(result: Any, model_id: str) -> str:
    """The --json object for one reply."""
    stats = asdict(result)
    body = {
        "model": model_id,
        "thinking": stats.pop("thinking"),
        "answer": stats.pop("answer"),
        "finish_reason": stats.pop("finish_reason"),
        "stats": stats,
    }
    return json.dumps(body, ensure_ascii=False, indent=2)


def prompt_command(
    ctx: typer.Context,
    text: TextArgument = None,
    model: o.ModelOption = None,
    json_output: JsonOption = False,
    transcript: TranscriptOption = None,
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
    """Send one message and print the answer (thinking hidden, or on stderr with --show-thinking)."""
    with reported_errors(ctx):
        message = read_message(text)
        spec = o.SessionSpec(
            model=resolve_model(model),
            thinking=not no_think,
            system=o.system_prompt(system, system_file),
            sampling=o.sampling_overrides(
                temperature=temp,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                presence_penalty=presence_penalty,
                seed=seed,
                max_tokens=max_tokens,
            ),
            rope_scaling=o.rope_scaling_block(rope_scaling, rope_factor),
            compute_dtype=compute_dtype.value,
        )
        from qwen3_mlx.cli.loading_status import loading

        with loading(spec.model):
            chat = spec.open_chat()
        if transcript is not None and transcript.exists():
            chat.load(transcript)
            # Flags given now win over what the transcript recorded.
            if spec.system is not None:
                chat.system = spec.system
            if no_think:
                chat.thinking = False
            for name, value in spec.sampling.items():
                chat.set(name, value)
        interrupted = _run_turn(chat, message, show_thinking=show_thinking, json_output=json_output)
        if transcript is not None and not interrupted:
            chat.save(transcript)
        if interrupted:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPT)


def _run_turn(chat: Any, message: str, *, show_thinking: bool, json_output: bool) -> bool:
    """Stream one reply; True when Ctrl-C stopped it."""
    before = chat.last_result
    events = chat.send(message)
    interrupted = False
    shown: list[str] = []
    try:
        stream_reply(events, show_thinking=show_thinking, collect_only=json_output, shown=shown)
    except KeyboardInterrupt:
        events.close()  # Chat records the partial reply, marked interrupted
        interrupted = True
    result = chat.last_result if chat.last_result is not before else None
    if json_output and result is not None:
        sys.stdout.write(result_json(result, chat.model_id) + "\n")
    elif result is not None and not json_output:
        streamed = "".join(shown)
        if result.answer.startswith(streamed):
            sys.stdout.write(result.answer[len(streamed) :])  # text held back when Ctrl-C came
        if result.answer and not result.answer.endswith("\n"):
            sys.stdout.write("\n")
    sys.stdout.flush()
    return interrupted
