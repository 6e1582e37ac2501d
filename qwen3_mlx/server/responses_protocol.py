"""OpenAI's Responses API (POST /v1/responses) as pydantic models: the part a local model serves.

Requests ignore unknown fields, as OpenAI clients expect. Input items are told apart by `type`; a
message may leave it out, as the SDK's "easy" messages do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from qwen3_mlx.server.protocol import setting_field
from qwen3_mlx.settings import SETTINGS


class ContentPart(BaseModel):
    """A part of a message or of a call's output; only text parts can be rendered."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class MessageItem(BaseModel):
    """A message of the conversation (`type` may be left out)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(BaseModel):
    """A call the model made, sent back as history."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """A tool's result for the call with `call_id`."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningText(BaseModel):
    """Text of a reasoning item's `content` or `summary`."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str


class ReasoningItem(BaseModel):
    """The model's reasoning, sent back so the next prompt renders it as the model wrote it."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


def _item_type(value: Any) -> str:
    item_type = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return item_type or "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(BaseModel):
    """A function tool, in the Responses API's flat shape."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class HostedTool(BaseModel):
    """A tool OpenAI runs itself (web search, file search, ...): refused with a clear 400."""

    model_config = ConfigDict(extra="allow")
    type: str


class FunctionChoice(BaseModel):
    """tool_choice {"type": "function", "name": ...}."""

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """text.format: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    """The `text` field: the answer's format (verbosity is accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None


class ReasoningConfig(BaseModel):
    """The `reasoning` field: effort "none" turns thinking off; other values leave it on."""

    model_config = ConfigDict(extra="allow")
    effort: str | None = None
    summary: str | None = None


class ResponseRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    tools: list[FunctionTool | HostedTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Any = setting_field(SETTINGS["max_tokens"])
    temperature: Any = setting_field(SETTINGS["temperature"])
    top_p: Any = setting_field(SETTINGS["top_p"])
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    # Beyond OpenAI's fields, as chat completions takes them.
    top_k: Any = setting_field(SETTINGS["top_k"])
    min_p: Any = setting_field(SETTINGS["min_p"])
    presence_penalty: Any = setting_field(SETTINGS["presence_penalty"])
    frequency_penalty: Any = setting_field(SETTINGS["frequency_penalty"])
    seed: Any = setting_field(SETTINGS["seed"])
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    speculative: bool | None = None  # as in chat: false turns speculative decoding off


class OutputText(BaseModel):
    """An output_text part of an answer message."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    """The answer, as an output item."""

    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    """A call the model made, as an output item."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class OutputReasoning(BaseModel):
    """The think block, as an output item (its text in `content`, no summary)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[ReasoningText] = []
    content: list[ReasoningText]
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    """How much of the prompt the prefix cache already held."""

    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """How many generated tokens were reasoning."""

    reasoning_tokens: int


class ResponseUsage(BaseModel):
    """Token counts of one response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    """Why a response failed."""

    code: str
    message: str


class ResponseObject(BaseModel):
    """A response: the answer to POST /v1/responses, and GET /v1/responses/{id}."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    store: bool
    metadata: dict[str, str] | None = None


class DeletedResponse(BaseModel):
    """DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool
