"""OpenAI's chat and completion protocol as pydantic models (their shapes, not ours).

Requests ignore unknown fields, as OpenAI clients expect; messages keep their extra keys (Qwen-Agent
sends `id`, `name` and `extra` on tool results) so the template sees what the client sent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from qwen3_mlx.settings import SETTINGS, Setting

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(BaseModel):
    """One part of a message's content (only text parts can be rendered)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    """The function of a tool call: its name and the argument text as written."""

    name: str
    arguments: str


class ToolCallMessage(BaseModel):
    """One entry of an assistant message's `tool_calls`."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SentFunctionCall(BaseModel):
    """A call's function as a client sends it back: argument text, or the arguments object."""

    name: str
    arguments: str | dict[str, Any]


class SentToolCall(ToolCallMessage):
    """An entry of `tool_calls` in the history a client sends."""

    function: SentFunctionCall  # type: ignore[assignment]


class ChatMessage(BaseModel):
    """A message of the conversation; extra keys are kept."""

    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[SentToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    """A tool's function: name, description and JSON-schema parameters."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """A tool in OpenAI's function format."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """The function a named tool_choice forces."""

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}."""

    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(BaseModel):
    """stream_options: whether a last chunk reports usage."""

    include_usage: bool | None = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: the schema the answer must match."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class RequestFields(BaseModel):
    """The request fields chat and completions share, beside the sampling settings."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=1, ge=1, le=128)
    user: str | None = None
    # Speculative decoding for this request: false turns it off, true asks for it (the default
    # on a server started with a drafter; a 400 without one).
    speculative: bool | None = None


def setting_field(setting: Setting) -> Any:
    """A sampling setting as an optional request field.

    The schema shows its type and range from SETTINGS, but pydantic leaves the value alone: the
    request is checked by SETTINGS' own validator, so a 400 says what the CLI says.
    """
    number: dict[str, Any] = {"type": "integer" if setting.kind is int else "number"}
    number["exclusiveMinimum" if setting.low_open else "minimum"] = setting.low
    if setting.high is not None:
        number["maximum"] = setting.high
    schema = {"anyOf": [number, {"type": "null"}], "description": setting.help}
    return Field(default=None, json_schema_extra=schema)


SamplingFields = create_model(
    "SamplingFields",
    __base__=RequestFields,
    __doc__="The request fields chat and completions share: every sampling setting, and the rest.",
    **{name: (Any, setting_field(setting)) for name, setting in SETTINGS.items()},
)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Any = setting_field(SETTINGS["max_tokens"])  # max_tokens' new name
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    # llama.cpp's per-request switch: "none" leaves <think>…</think> in the content, "deepseek"
    # splits it into reasoning_content, "auto" keeps the server's --reasoning-field.
    reasoning_format: Literal["none", "auto", "deepseek"] | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: a raw prompt, no template."""

    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = False


class TokenizeRequest(BaseModel):
    """POST /tokenize: text, or messages rendered through the template first."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    """The ids of the text or the rendered prompt."""

    tokens: list[int]
    count: int
    max_model_len: int


class ApplyTemplateResponse(BaseModel):
    """The exact prompt text the template makes, and its token count."""

    prompt: str
    tokens: int


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """{"error": {...}}, the body of every non-2xx answer."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    """How much of the prompt the prefix cache already held."""

    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    """How many generated tokens were reasoning, and how many drafted ones were accepted or not
    (speculative decoding; 0 without a drafter)."""

    reasoning_tokens: int
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(BaseModel):
    """One alternative token and its log probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token, its log probability and the likeliest alternatives."""

    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    """Logprobs of the answer's tokens."""

    content: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    """The assistant message of a non-streamed choice."""

    model_config = ConfigDict(extra="allow")  # reasoning_content and/or reasoning
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallMessage] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    """The answer to a non-streamed chat request."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    """One choice of a text completion."""

    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """The answer to a non-streamed completions request."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    """One entry of /v1/models, with facts about the model."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen3-mlx"


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """GET /health."""

    status: Literal["ok"]
    queued: int
    running: int
