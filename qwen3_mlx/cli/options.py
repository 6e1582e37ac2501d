"""Options shared by several commands, defined once as Annotated aliases, and what they build."""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen3_mlx.cli.user_config import MODEL_ENV
from qwen3_mlx.errors import SettingsError
from qwen3_mlx.settings import SETTINGS, Setting

SESSION = "Model and session"
SAMPLING = "Sampling (defaults: the model's preset for the current mode)"
TOOLS = "MCP tools"


class RopeScaling(str, Enum):
    """Context extension: static YaRN, or YaRN only once the conversation needs it."""

    yarn = "yarn"
    auto = "auto"


class ComputeDtype(str, Enum):
    """The dtype activations and unquantized weights use."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ToolsMode(str, Enum):
    """Whether the configured MCP servers start (none: off for this run)."""

    auto = "auto"
    none = "none"


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar=MODEL_ENV,
        show_default=False,
        metavar="PATH|REPO",
        help="Model folder or Hugging Face repo id [default: config file, else Qwen/Qwen3-4B-MLX-4bit].",
        rich_help_panel=SESSION,
    ),
]
ModelArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="MODEL",
        envvar=MODEL_ENV,
        show_default=False,
        help="Model folder or Hugging Face repo id [default: $QWEN3_MLX_MODEL, config file, Qwen/Qwen3-4B-MLX-4bit].",
    ),
]
NoThinkOption = Annotated[
    bool,
    typer.Option(
        "--no-think",
        help="Start with thinking off (the template's hard switch).",
        rich_help_panel=SESSION,
    ),
]
SystemOption = Annotated[
    str | None,
    typer.Option("--system", "-s", metavar="TEXT", help="System prompt.", rich_help_panel=SESSION),
]
SystemFileOption = Annotated[
    Path | None,
    typer.Option(
        "--system-file",
        metavar="FILE",
        exists=True,
        dir_okay=False,
        readable=True,
        help="Read the system prompt from a file.",
        rich_help_panel=SESSION,
    ),
]
ShowThinkingOption = Annotated[
    bool,
    typer.Option(
        "--show-thinking", help="Show the model's reasoning in full.", rich_help_panel=SESSION
    ),
]
RopeScalingOption = Annotated[
    RopeScaling | None,
    typer.Option(
        "--rope-scaling",
        metavar="yarn|auto",
        help="Extend the context window with YaRN: always (yarn), or only once the conversation "
        "passes the trained window (auto: factor 2, then 4).",
        rich_help_panel=SESSION,
    ),
]
RopeFactorOption = Annotated[
    float | None,
    typer.Option(
        "--rope-factor",
        metavar="F",
        show_default=False,
        help="YaRN factor: context = 32,768 x F [default: 4.0].",
        rich_help_panel=SESSION,
    ),
]
ComputeDtypeOption = Annotated[
    ComputeDtype,
    typer.Option(
        "--compute-dtype",
        metavar="auto|float32|bfloat16|float16",
        help="Activation dtype; auto = float32 on the CPU backend, the checkpoint's on a GPU.",
        rich_help_panel=SESSION,
    ),
]

McpConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--mcp-config",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
        help='MCP servers to use as tools: a {"mcpServers": {...}} JSON file [default: mcp_config in config.toml].',
        rich_help_panel=TOOLS,
    ),
]
ToolsOption = Annotated[
    ToolsMode,
    typer.Option(
        "--tools",
        metavar="auto|none",
        help="none: start no MCP server this run.",
        rich_help_panel=TOOLS,
    ),
]
YesOption = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        help="Run every tool call without asking (otherwise only mcp_allow tools run unasked).",
        rich_help_panel=TOOLS,
    ),
]
MaxToolStepsOption = Annotated[
    int,
    typer.Option(
        "--max-tool-steps",
        metavar="N",
        min=1,
        help="Stop a tool loop after N rounds of calls.",
        rich_help_panel=TOOLS,
    ),
]


class KvBits(str, Enum):
    """Bits of a quantized KV cache."""

    eight = "8"
    four = "4"


KvBitsOption = Annotated[
    KvBits | None,
    typer.Option(
        "--kv-bits",
        metavar="8|4",
        help="Quantize the KV cache (group 64): 8 bits keeps the answers (27 % of a float32 "
        "cache, 53 % of bf16), 4 bits halves that again, with more drift.",
        rich_help_panel=SESSION,
    ),
]


class DraftKind(str, Enum):
    """Drafters that need no model of their own."""

    ngram = "ngram"


DraftModelOption = Annotated[
    str | None,
    typer.Option(
        "--draft-model",
        metavar="PATH|REPO",
        show_default=False,
        help="Speculative decoding: a small model with the same tokenizer drafts tokens that "
        "this model checks several at a time; output is exactly what it would be without "
        "[default: draft_model in config.toml].",
        rich_help_panel=SESSION,
    ),
]
DraftOption = Annotated[
    DraftKind | None,
    typer.Option(
        "--draft",
        metavar="ngram",
        show_default=False,
        help="Speculative decoding without a draft model: ngram drafts what followed the last "
        "few tokens earlier in the prompt and reply (pays off when replies repeat the context).",
        rich_help_panel=SESSION,
    ),
]
DraftTokensOption = Annotated[
    int | None,
    typer.Option(
        "--draft-tokens",
        metavar="N",
        min=1,
        max=7,
        show_default=False,
        help="Most tokens drafted per step, 1 to 7 [default: 3].",
        rich_help_panel=SESSION,
    ),
]


def draft_spec(model: str | None, kind: DraftKind | None, tokens: int | None) -> Any:
    """The DraftSpec the draft flags describe (else config.toml's draft_model, draft and
    draft_tokens), or None for plain decoding."""
    from qwen3_mlx.cli.user_config import read_config_file
    from qwen3_mlx.speculative import DraftSpec

    if model is not None and kind is not None:
        raise typer.BadParameter(
            "give --draft-model or --draft ngram, not both", param_hint="--draft"
        )
    if model is None and kind is None:
        config = read_config_file()
        model, kind = config.get("draft_model"), config.get("draft")
        tokens = tokens if tokens is not None else config.get("draft_tokens")
        if kind is not None and kind != DraftKind.ngram.value:
            raise typer.BadParameter(f"draft = {kind!r} in config.toml: the one kind is 'ngram'")
    if model is None and kind is None:
        if tokens is not None:
            raise typer.BadParameter(
                "needs --draft-model or --draft ngram", param_hint="--draft-tokens"
            )
        return None
    if tokens is not None and not 1 <= tokens <= 7:
        raise typer.BadParameter(f"draft_tokens = {tokens} in config.toml: 1 to 7")
    return DraftSpec(model=None if kind else model, ngram=kind is not None, tokens=tokens)


def _setting_checker(setting: Setting) -> Any:
    def check(value: Any) -> Any:
        if value is None:
            return None
        try:
            return setting.validate(value)
        except SettingsError as error:
            raise typer.BadParameter(str(error)) from None

    return check


def _sampling_option(name: str) -> Any:
    """The Typer option for one setting of the record: its flags, help, and range checked at parse
    time, so a bad value is a usage error (exit 2) before any model loads. The text goes to the
    setting's own validator (not Click's number types), so the error reads as the server's 400."""
    setting = SETTINGS[name]
    return Annotated[
        str | None,
        typer.Option(
            *setting.flags,
            metavar=setting.metavar,
            help=f"{setting.help} Range {setting.range_text}.",
            callback=_setting_checker(setting),
            show_default=False,
            rich_help_panel=SAMPLING,
        ),
    ]


def rope_scaling_block(kind: RopeScaling | None, factor: float | None) -> dict[str, Any] | None:
    """The rope_scaling dict for the loader, or None; --rope-factor alone is a usage error."""
    if kind is None or kind is RopeScaling.auto:
        if factor is not None:
            raise typer.BadParameter(
                "needs --rope-scaling yarn (auto picks 2, then 4)", param_hint="--rope-factor"
            )
        return None
    if factor is not None and not (math.isfinite(factor) and factor > 1.0):
        raise typer.BadParameter(
            f"must be a number greater than 1, not {factor:g}", param_hint="--rope-factor"
        )
    from qwen3_mlx.config import YARN_DEFAULT_FACTOR, yarn_scaling

    return yarn_scaling(YARN_DEFAULT_FACTOR if factor is None else factor)


def system_prompt(text: str | None, file: Path | None) -> str | None:
    """The system prompt from --system or --system-file (not both)."""
    if text is not None and file is not None:
        raise typer.BadParameter(
            "give --system or --system-file, not both", param_hint="--system-file"
        )
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(
                f"cannot read {file}: {error}", param_hint="--system-file"
            ) from None
    return text


@dataclass
class SessionSpec:
    """Everything needed to open a Chat, gathered from the shared options."""

    model: str
    thinking: bool = True
    system: str | None = None
    show_thinking: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)
    rope_scaling: dict[str, Any] | None = None
    auto_rope: bool = False  # --rope-scaling auto
    compute_dtype: str = "auto"
    kv_bits: int | None = None
    mcp_config: Path | None = None
    mcp_allow: list[str] = field(default_factory=list)
    tools_enabled: bool = True
    yes: bool = False
    max_tool_steps: int = 8
    draft: Any = None  # a speculative.DraftSpec, or None for plain decoding
    debug: bool = False  # --debug: one line names the drafter

    def open_chat(self) -> Any:
        """Load the model and start a Chat (imports MLX and the model code only now)."""
        from qwen3_mlx.chat import Chat
        from qwen3_mlx.parallel.distributed import current_group, load_for_group

        chat = Chat.from_pretrained(
            self.model,
            load=functools.partial(load_for_group, group=current_group()),
            rope_scaling=self.rope_scaling,
            compute_dtype=self.compute_dtype,
            system=self.system,
            thinking=self.thinking,
            sampling=self.sampling or None,
            kv_bits=self.kv_bits,
            auto_rope=self.auto_rope,
            draft=self.draft,
        )
        debug_draft_note(chat.speculation, self.debug)
        return chat


def debug_draft_note(speculation: Any, debug: bool) -> None:
    """Under --debug, one stderr line saying what drafts and how many tokens a step."""
    if speculation is not None and debug:
        print(
            f"speculative decoding: {speculation.name} drafts {speculation.draft_tokens} tokens "
            "a step; the model checks them in one pass (output unchanged)",
            file=sys.stderr,
            flush=True,
        )


# The options `chat` and `prompt` share, declared once: with_session_options adds them to a
# command's signature (Typer reads the signature) and hands them over as one SessionOptions.
SESSION_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
    for name, annotation, default in (
        ("model", ModelOption, None),
        ("no_think", NoThinkOption, False),
        ("system", SystemOption, None),
        ("system_file", SystemFileOption, None),
        ("show_thinking", ShowThinkingOption, False),
        *((name, _sampling_option(name), None) for name in SETTINGS),
        ("rope_scaling", RopeScalingOption, None),
        ("rope_factor", RopeFactorOption, None),
        ("compute_dtype", ComputeDtypeOption, ComputeDtype.auto),
        ("kv_bits", KvBitsOption, None),
        ("draft_model", DraftModelOption, None),
        ("draft", DraftOption, None),
        ("draft_tokens", DraftTokensOption, None),
        ("mcp_config", McpConfigOption, None),
        ("tools", ToolsOption, ToolsMode.auto),
        ("yes", YesOption, False),
        ("max_tool_steps", MaxToolStepsOption, 8),
    )
]


@dataclass(frozen=True)
class SessionOptions:
    """The shared options as given; spec() checks them and resolves the model."""

    values: dict[str, Any]

    def spec(self, ctx: typer.Context | None = None) -> SessionSpec:
        """The SessionSpec they describe (usage errors raise typer.BadParameter); ctx: the
        command's, for --debug."""
        from qwen3_mlx.cli.guard import is_debug
        from qwen3_mlx.cli.user_config import mcp_settings, resolve_model

        values = self.values
        mcp_config, mcp_allow = mcp_settings(values["mcp_config"])
        rope = rope_scaling_block(values["rope_scaling"], values["rope_factor"])
        system = system_prompt(values["system"], values["system_file"])
        return SessionSpec(
            model=resolve_model(values["model"]),
            thinking=not values["no_think"],
            system=system,
            show_thinking=values["show_thinking"],
            sampling={name: values[name] for name in SETTINGS if values[name] is not None},
            rope_scaling=rope,
            auto_rope=values["rope_scaling"] is RopeScaling.auto,
            compute_dtype=values["compute_dtype"].value,
            kv_bits=int(values["kv_bits"].value) if values["kv_bits"] is not None else None,
            mcp_config=mcp_config,
            mcp_allow=mcp_allow,
            tools_enabled=values["tools"] is not ToolsMode.none,
            yes=values["yes"],
            max_tool_steps=values["max_tool_steps"],
            draft=draft_spec(values["draft_model"], values["draft"], values["draft_tokens"]),
            debug=is_debug(ctx),
        )


def with_session_options(
    command: Callable[..., None] | None = None, *, only: Collection[str] | None = None
) -> Any:
    """Give a command the shared session options; it receives them as `session: SessionOptions`.

    only: the names of the shared options the command takes (serve takes the model, sampling and
    context ones); the others keep their defaults. Used bare or as `with_session_options(only=...)`.
    """
    if command is None:
        return functools.partial(with_session_options, only=only)
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "session"]
    shared = [p for p in SESSION_PARAMETERS if only is None or p.name in only]
    defaults = {p.name: p.default for p in SESSION_PARAMETERS}

    @functools.wraps(command)
    def run(**values: Any) -> None:
        picked = {p.name: values.pop(p.name) for p in shared}
        command(session=SessionOptions({**defaults, **picked}), **values)

    run.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
    return run
