"""What a Reply yields (text deltas by kind) and the frozen record it ends with (TurnResult)."""

from __future__ import annotations

from dataclasses import dataclass

from qwen3_mlx.tools import ToolCall

# tool_calls: the reply ended (stop) after at least one valid tool call.
FINISH_REASONS = ("stop", "length", "interrupted", "repetition", "tool_calls")


@dataclass(frozen=True)
class ThinkingText:
    """A piece of the reasoning inside <think>…</think>."""

    text: str
    tokens: int = 0  # thinking tokens generated so far, this piece included


@dataclass(frozen=True)
class AnswerText:
    """A piece of the final answer."""

    text: str


@dataclass(frozen=True)
class ToolCallText:
    """A piece of the text of tool call number `index` (0-based) as it is written."""

    text: str
    index: int


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call the reply has finished writing (valid, or invalid with its error)."""

    call: ToolCall
    index: int


@dataclass(frozen=True)
class TurnResult:
    """The end of one reply: how it ended, what it said, and what it cost."""

    finish_reason: str  # one of FINISH_REASONS
    answer: str
    thinking: str
    thinking_finished: bool  # False when the reply stopped inside the think block
    prompt_tokens: int  # tokens of the rendered prompt
    prefilled_tokens: int  # tokens actually run through the model (after cache reuse)
    generated_tokens: int
    thinking_tokens: int  # tokens inside the think block (its markers not counted)
    time_to_first_token: float  # seconds
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    thinking_seconds: float
    peak_memory_gb: float
    tool_calls: tuple[ToolCall, ...] = ()  # every call, valid or not, in order
    # Speculative decoding: target passes that generated the reply, and the drafted tokens they
    # checked and accepted (plain decoding: one pass per token, none drafted).
    target_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def draft_acceptance(self) -> float:
        """Accepted drafted tokens per drafted token (0.0 when none were drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_target_step(self) -> float:
        """Generated tokens per target pass (1.0 for plain decoding)."""
        return self.generated_tokens / self.target_steps if self.target_steps else 0.0


ReplyEvent = ThinkingText | AnswerText | ToolCallText | ToolCallEvent
