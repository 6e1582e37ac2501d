"""Options shared by several commands, defined once as Annotated aliases, and what they build."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen3_mlx.cli.user_config import MODEL_ENV

SESSION = "Model and session"
SAMPLING = "Sampling (defaults: the model's preset for the current mode)"


class RopeScaling(str, Enum):
    """Context extension methods the loader understands."""

    yarn = "yarn"


class ComputeDtype(str, Enum):
    """The dtype activations and unquantized weights use."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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
        metavar="yarn",
        help="Extend the context window (YaRN).",
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
TempOption = Annotated[
    float | None,
    typer.Option(
        "--temp",
        "--temperature",
        min=0.0,
        metavar="T",
        help="Temperature (0 = greedy).",
        rich_help_panel=SAMPLING,
    ),
]
TopPOption = Annotated[
    float | None,
    typer.Option(
        "--top-p",
        min=0.0,
        max=1.0,
        metavar="P",
        help="Nucleus sampling mass.",
        rich_help_panel=SAMPLING,
    ),
]
TopKOption = Annotated[
    int | None,
    typer.Option(
        "--top-k",
        min=0,
        metavar="K",
        help="Keep the k likeliest tokens (0 = all).",
        rich_help_panel=SAMPLING,
    ),
]
MinPOption = Annotated[
    float | None,
    typer.Option(
        "--min-p",
        min=0.0,
        max=1.0,
        metavar="P",
        help="Drop tokens below min_p x the top probability.",
        rich_help_panel=SAMPLING,
    ),
]
PresencePenaltyOption = Annotated[
    float | None,
    typer.Option(
        "--presence-penalty",
        min=-2.0,
        max=2.0,
        metavar="X",
        help="Penalise tokens already generated.",
        rich_help_panel=SAMPLING,
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed",
        min=0,
        metavar="N",
        help="Random seed, for repeatable replies.",
        rich_help_panel=SAMPLING,
    ),
]
MaxTokensOption = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        min=1,
        metavar="N",
        help="Most tokens per reply, thinking included.",
        rich_help_panel=SAMPLING,
    ),
]


def sampling_overrides(**values: Any) -> dict[str, Any]:
    """The sampling settings given on the command line (None = not given, keep the preset)."""
    return {name: value for name, value in values.items() if value is not None}


def rope_scaling_block(kind: RopeScaling | None, factor: float | None) -> dict[str, Any] | None:
    """The rope_scaling dict for the loader, or None; --rope-factor alone is a usage error."""
    if kind is None:
        if factor is not None:
            raise typer.BadParameter("needs --rope-scaling yarn", param_hint="--rope-factor")
        return None
    if factor is not None and factor <= 1.0:
        raise typer.BadParameter(
            f"must be greater than 1, not {factor:g}", param_hint="--rope-factor"
        )
    from qwen3_mlx.config import yarn_scaling

    return yarn_scaling(4.0 if factor is None else factor)


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
    sampling: dict[str, Any] = field(default_factory=dict)
    rope_scaling: dict[str, Any] | None = None
    compute_dtype: str = "auto"

    def open_chat(self) -> Any:
        """Load the model and start a Chat (imports MLX and the model code only now)."""
        from qwen3_mlx.chat import Chat

        return Chat.from_pretrained(
            self.model,
            rope_scaling=self.rope_scaling,
            compute_dtype=self.compute_dtype,
            system=self.system,
            thinking=self.thinking,
            sampling=self.sampling or None,
        )
