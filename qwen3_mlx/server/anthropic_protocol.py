"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) as pydantic models.

Requests ignore unknown fields (cache_control, metadata, service_tier, ...). Content blocks are
told apart by `type`; images and documents are accepted by the schema and refused with a clear
400, since the model reads text only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwen3_mlx.server.protocol import setting_field
from qwen3_mlx.settings import SETTINGS


class TextBlock(BaseModel):
    """A text block."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class MediaBlock(BaseModel):
    """An image or document block (refused: the model reads text only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document"]


class ToolUseBlock(BaseModel):
    """A call the model made, sent back in an assistant message."""

    model_config = ConfigDict(extra="allow")
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    """A tool's result, in a user message."""

    model_config = ConfigDict(extra="allow")
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | MediaBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(BaseModel):
    """The model's reasoning, sent back so the next prompt renders it as the model wrote it."""

    model_config = ConfigDict(extra="allow")
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    """Reasoning another server encrypted: skipped."""

    model_config = ConfigDict(extra="allow")
    type: Literal["redacted_thinking"]


ContentBlock = Annotated[
    TextBlock | MediaBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(BaseModel):
    """A turn of the conversation."""

    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(BaseModel):
    """A client tool: name, description and the JSON schema of its input."""

    model_config = ConfigDict(extra="allow")
    type: str | None = None  # "custom" or absent; server tools are refused
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(BaseModel):
    """tool_choice: auto, any (a call is required), one named tool, or none."""

    model_config = ConfigDict(extra="allow")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(BaseModel):
    """thinking: disabled turns the model's thinking off; the other types leave it on (a budget
    is accepted and not enforced)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None


class OutputFormat(BaseModel):
    """output_config.format: the answer is JSON matching `schema`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    """output_config: the answer's format (effort is accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    format: OutputFormat | None = None


class CountTokensRequest(BaseModel):
    """POST /v1/messages/count_tokens."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: Any = setting_field(SETTINGS["max_tokens"])  # required by Anthropic, not here
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: Any = setting_field(SETTINGS["temperature"])
    top_p: Any = setting_field(SETTINGS["top_p"])
    top_k: Any = setting_field(SETTINGS["top_k"])
    output_config: OutputConfig | None = None
    speculative: bool | None = None  # as in chat: false turns speculative decoding off


class TokenCount(BaseModel):
    """The answer to count_tokens."""

    input_tokens: int


class OutputText(BaseModel):
    """A text block of the answer."""

    type: Literal["text"] = "text"
    text: str


class OutputThinking(BaseModel):
    """The think block, with a signature clients can send back (nothing here checks it)."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class OutputToolUse(BaseModel):
    """A call the model made."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    """Token counts: input_tokens is the part of the prompt the prefix cache did not hold."""

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessageResponse(BaseModel):
    """The answer to a non-streamed POST /v1/messages."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputThinking | OutputText | OutputToolUse]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class ErrorDetail(BaseModel):
    """Anthropic's error object."""

    type: str
    message: str


class ErrorResponse(BaseModel):
    """{"type": "error", "error": {...}}, the body of every non-2xx answer of these routes."""

    type: Literal["error"] = "error"
    error: ErrorDetail
