"""Errors a user can cause. Library code raises these; only the CLI turns them into exit codes."""


class Qwen3Error(Exception):
    """Base class: the message is one line a user can act on."""


class ConfigError(Qwen3Error):
    """config.json is missing, malformed, not Qwen3, or lacks a required key."""


class CheckpointError(Qwen3Error):
    """A weight file is missing, truncated, corrupt, or holds a tensor of the wrong shape."""


class ModelNotFoundError(Qwen3Error):
    """Neither a local folder nor a reachable (or cached) Hugging Face repo."""


class QuantizationError(Qwen3Error):
    """An unknown or unsupported quantization setting."""


class TemplateError(Qwen3Error):
    """The chat template cannot do what was asked (for example, turn thinking off)."""


class ContextOverflowError(Qwen3Error):
    """A prompt does not fit in the model's context window.

    It carries the numbers, not advice: each front end knows its own ways out (/undo in the REPL,
    a shorter message for `prompt`, an HTTP 400 for the server).
    """

    def __init__(
        self,
        prompt_tokens: int,
        context_limit: int,
        *,
        yarn_enabled: bool = False,
        at_least: bool = False,
    ):
        self.prompt_tokens = prompt_tokens  # a lower bound when at_least (counted by size alone)
        self.context_limit = context_limit
        self.yarn_enabled = yarn_enabled
        self.at_least = at_least
        needs = f"at least {prompt_tokens:,}" if at_least else f"{prompt_tokens:,}"
        super().__init__(
            f"the prompt needs {needs} tokens but the context holds {context_limit:,} "
            "(a reply needs room too)"
        )


class TranscriptError(Qwen3Error):
    """A transcript file cannot be read or written."""


class SettingsError(Qwen3Error):
    """A sampling setting has an unknown name or a value out of range."""

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting  # the setting at fault (a server names it as the error's param)


class HistoryError(Qwen3Error):
    """The conversation has no exchange to undo or retry."""


class ToolError(Qwen3Error):
    """A tool definition, tool_choice or tool result that cannot be used."""


class DistributedError(Qwen3Error):
    """The group of ranks is misconfigured or broke apart."""
