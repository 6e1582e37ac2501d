"""`qwen3-mlx prompt`: one message in, the answer out; made for pipes and scripts."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qwen3_mlx.cli import options as o
from qwen3_mlx.cli.distributed_run import distributed_command
from qwen3_mlx.cli.guard import EXIT_INTERRUPT, reported_errors, stop_on_signals
from qwen3_mlx.errors import ContextOverflowError, Qwen3Error
from qwen3_mlx.limits import MAX_TOKEN_BYTES
from qwen3_mlx.transcript import check_writable, user_path
from qwen3_mlx.visible import visible_name

if TYPE_CHECKING:  # types only: importing chat loads mlx, and `--help` must not
    from qwen3_mlx.chat import Chat

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


# No Qwen3 context holds more: 262,144 tokens (Thinking-2507) of at most MAX_TOKEN_BYTES each. A
# longer stdin is refused after a bounded read, so a runaway pipe never fills the memory; the
# exact fit is checked once the model is loaded.
MAX_MESSAGE_BYTES = 262_144 * MAX_TOKEN_BYTES


def read_message(text: str | None) -> str:
    """The message from the argument, or from stdin for '-' or a pipe (bad UTF-8 replaced)."""
    if text is not None and text != "-":
        # argv arrives with undecodable bytes as surrogate escapes
        raw = text.encode("utf-8", "surrogateescape")
    elif text is None and (sys.stdin is None or sys.stdin.isatty()):
        raise typer.BadParameter(
            "give the message as TEXT, or pipe it in on stdin", param_hint="TEXT"
        )
    else:
        raw = sys.stdin.buffer.read(MAX_MESSAGE_BYTES + 1)
        if len(raw) > MAX_MESSAGE_BYTES:
            raise typer.BadParameter(
                f"the message on stdin is over {MAX_MESSAGE_BYTES // 2**20} MiB, more than any "
                "context holds",
                param_hint="TEXT",
            )
    message = raw.decode("utf-8", "replace")
    if "\ufffd" in message and "\ufffd".encode() not in raw:
        print(
            "Warning: the message is not valid UTF-8 (Latin-1?): bad bytes became U+FFFD (�)",
            file=sys.stderr,
        )
    if not message.strip():
        raise typer.BadParameter("the message is empty", param_hint="TEXT")
    return message.strip("\n")


def stream_reply(events: Any, *, show_thinking: bool, collect_only: bool) -> None:
    """Write answer text to stdout as it comes; thinking to stderr when asked for.

    With hidden thinking and a person at the terminal, a 'thinking…' spinner on stderr shows that
    the model is working; in pipes nothing but the answer is written.
    """
    from qwen3_mlx.events import AnswerText, ThinkingText, ToolCallEvent

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
            elif isinstance(event, ToolCallEvent) and not collect_only:
                # A call is not answer text: it goes to stderr, an invalid one with its error.
                sys.stderr.write(
                    ("tool call: " if event.call.valid else "") + event.call.describe()
                )
                sys.stderr.write("\n")
            elif isinstance(event, AnswerText) and not collect_only:
                if spinner is not None:
                    spinner.stop()
                if thinking_open:
                    sys.stderr.write("\n")
                    thinking_open = False
                sys.stdout.write(event.text)
                sys.stdout.flush()
    finally:
        if spinner is not None:
            spinner.stop()


def result_json(result: Any, model_id: str, tool_steps: list | None = None) -> str:
    """The --json object for one reply (the last of a tool loop, with the loop's steps)."""
    stats = asdict(result)
    body = {
        "model": model_id,
        "thinking": stats.pop("thinking"),
        "answer": stats.pop("answer"),
        "finish_reason": stats.pop("finish_reason"),
        "tool_calls": stats.pop("tool_calls"),
        "stats": stats,
    }
    if result.drafted_tokens:
        stats["draft_acceptance"] = round(result.draft_acceptance, 4)
        stats["tokens_per_target_step"] = round(result.tokens_per_target_step, 4)
    if tool_steps is not None:
        body["tool_steps"] = tool_steps
    return json.dumps(body, ensure_ascii=False, indent=2)


@o.with_session_options
@distributed_command
def prompt_command(
    ctx: typer.Context,
    session: o.SessionOptions,
    text: TextArgument = None,
    json_output: JsonOption = False,
    transcript: TranscriptOption = None,
) -> None:
    """Send one message and print the answer (thinking hidden, or on stderr with --show-thinking)."""
    with reported_errors(ctx), stop_on_signals():
        spec = session.spec(ctx)
        message = read_message(text)
        if transcript is not None:
            transcript = user_path(transcript)
            check_writable(transcript)  # before the reply: never make anyone wait for nothing
        from qwen3_mlx.cli.tool_steps import open_tool_session

        tools = open_tool_session(spec)  # the servers start while the model loads
        try:
            _answer(spec, tools, message, json_output, transcript)
        finally:
            if tools is not None:
                tools.manager.close()


def _answer(
    spec: Any, tools: Any, message: str, json_output: bool, transcript: Path | None
) -> None:
    """Load the model, run the turn (and its tool loop) and save the transcript."""
    from qwen3_mlx.cli.loading_status import loading

    with loading(spec.model):
        chat = spec.open_chat()
    from qwen3_mlx.cli.render import PrefillProgress

    progress = PrefillProgress(sys.stderr)
    chat.on_prefill = progress
    chat.on_notice = lambda line: print(f"Note: {line}", file=sys.stderr, flush=True)
    for problem in tools.wait_started(chat) if tools is not None else []:
        print(f"Warning: {problem}", file=sys.stderr, flush=True)
    with_cache = False
    if transcript is not None and transcript.exists():
        cache_note = chat.load(transcript)
        # A transcript saved with its KV cache keeps it: written back fresh after this reply.
        with_cache = cache_note is not None
        if cache_note and not cache_note.startswith("restored"):
            print(f"Note: {cache_note}", file=sys.stderr)
        # Flags given now win over what the transcript recorded.
        if spec.system is not None:
            chat.system = spec.system
        if not spec.thinking:
            chat.thinking = False
        for name, value in spec.sampling.items():
            chat.set(name, value)
    result = _run_turn(chat, message, spec.show_thinking, json_output, progress.clear, tools)
    interrupted = result is None or result.finish_reason == "interrupted"
    if transcript is not None and not interrupted:
        chat.save(transcript, with_cache=with_cache)
    if interrupted:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPT)


@contextmanager
def stdout_errors() -> Iterator[None]:
    """A failed write of the answer (a full disk) becomes one line; a closed pipe stays quiet."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        # Point stdout at /dev/null, or Python's own flush at exit would report it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise Qwen3Error(f"cannot write to stdout ({error.strerror or error})") from None


def _run_turn(
    chat: Chat,
    message: str,
    show_thinking: bool,
    json_output: bool,
    clear_progress: Callable[[], None],
    tools: Any = None,
) -> Any:
    """Stream one reply and its tool loop; return the last TurnResult ('interrupted' after Ctrl-C)."""
    try:
        reply = chat.send(message)
    except ContextOverflowError as error:
        ways = "shorten the message"
        if not error.yarn_enabled:
            ways += " or add --rope-scaling yarn --rope-factor 4 for 4x the context"
        raise Qwen3Error(f"{error}: {ways}") from None
    with stdout_errors():
        result = _stream(reply, show_thinking, json_output, clear_progress)
        steps: list[list[dict[str, Any]]] | None = None
        if tools is not None:
            loop = tools.loop(*_hooks())
            end = loop.chain(
                chat,
                result,
                lambda start: _stream(start(), show_thinking, json_output, clear_progress),
            )
            if end.out_of_steps:
                print(
                    f"stopped after {len(end.rounds)} tool steps (--max-tool-steps "
                    f"{loop.max_steps})",
                    file=sys.stderr,
                )
            result = end.result
            steps = [[step.record() for step in round_] for round_ in end.rounds]
        if json_output:
            sys.stdout.write(result_json(result, chat.model_id, steps) + "\n")
        elif result.answer and not result.answer.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
    return result


def _stream(
    reply: Any, show_thinking: bool, json_output: bool, clear_progress: Callable[[], None]
) -> Any:
    """Stream one reply; Ctrl-C closes it (recorded as interrupted) and shows what it held back."""
    try:
        stream_reply(reply, show_thinking=show_thinking, collect_only=json_output)
    except KeyboardInterrupt:
        clear_progress()  # a prefill cut short leaves no half line
        reply.close()  # Chat records the partial reply, marked interrupted
        stream_reply(reply, show_thinking=show_thinking, collect_only=json_output)
    return reply.result


def _hooks() -> tuple[Callable[[Any, Any], str], Callable[[Any], None]]:
    """The loop's consent and drawing hooks: the calls --yes or mcp_allow permit run; the rest
    are asked about on the terminal when there is one, and declined when there is not (no one
    to ask in a script)."""
    from qwen3_mlx.cli.render import step_line
    from qwen3_mlx.tool_loop import shown_call

    def decline(tool: Any, call: Any) -> str:
        print(
            f"tool call {shown_call(tool.label, call)} declined: prompt runs tools only with "
            f"--yes, when mcp_allow in config.toml names them ('{visible_name(tool.label)}'), "
            "or when asked on a terminal",
            file=sys.stderr,
        )
        return "no"

    terminal = sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()

    def on_step(step: Any) -> None:
        if step.status != "declined" or terminal:
            print(step_line(step), file=sys.stderr)
        if step.cut_note():
            print(f"Warning: {step.cut_note()}", file=sys.stderr)

    return (ask_on_terminal if terminal else decline), on_step


def ask_on_terminal(tool: Any, call: Any) -> str:
    """The consent question on stderr, the answer from the terminal; end of input means no.

    Ctrl-C is not an answer: it ends `prompt` (exit 130), and the servers are stopped.
    """
    from qwen3_mlx.tool_loop import ask_consent, consent_question

    def read(question: str) -> str | None:
        sys.stderr.write(question)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            sys.stderr.write("\n")
            return None
        return line

    def retry(line: str) -> None:
        sys.stderr.write(line + "\n")

    return ask_consent(consent_question(tool.label, call), read, retry)
