"""From an OpenAI request to what the engine needs: messages, explicit settings, tool setup.

The prompt itself is the engine's (`prepare_prompt`), as for the REPL. Every refusal is an ApiError
carrying its HTTP status, OpenAI error type and the field at fault; `api_error` gives the engine's
own errors (context, settings, template) theirs, in the engine's words.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qwen3_mlx.engine import ToolSetup, prepare_prompt
from qwen3_mlx.errors import (
    ContextOverflowError,
    Qwen3Error,
    SettingsError,
    TemplateError,
    ToolError,
)
from qwen3_mlx.server.processors import ResponseFormatError, answer_template
from qwen3_mlx.server.protocol import ChatCompletionRequest, ChatMessage, SamplingFields
from qwen3_mlx.settings import SETTINGS, Sampling, SamplingDefaults
from qwen3_mlx.tokenizer import Tokenizer
from qwen3_mlx.tool_choice import SchemaError, argument_grammar
from qwen3_mlx.tools import (
    ToolCall,
    ToolResult,
    check_tools,
    normalize_messages,
    order_results,
    tool_choice_name,
)


class ApiError(Qwen3Error):
    """A request the server refuses, with the status and OpenAI error fields to answer with."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param
        self.code = code


def api_error(error: Qwen3Error) -> ApiError:
    """The HTTP answer for an error of the engine: its own message, with status and field."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ContextOverflowError):
        # In OpenAI's words: litellm and other clients recognise an overflow by this sentence.
        tokens = f"{'at least ' if error.at_least else ''}{error.prompt_tokens}"
        message = overflow_message(error.context_limit, tokens)
        return ApiError(message, param="messages", code="context_length_exceeded")
    if isinstance(error, SettingsError):
        return ApiError(str(error), param=error.setting)
    if isinstance(error, TemplateError):  # the template cannot render these messages
        return ApiError(str(error), status=422, param="messages")
    return ApiError(str(error))


class ModelContext(Protocol):
    """What preparing a request reads of the server (its ServerState)."""

    model: Any  # its vocabulary size bounds the grammars' masks
    tokenizer: Tokenizer
    generation_config: SamplingDefaults
    context_limit: int
    defaults: dict[str, Any]  # the sampling flags of `serve`
    grammars: dict[str, Any]


@dataclass
class Prepared:
    """A request turned into engine inputs."""

    prompt: list[int]
    sampling: Sampling
    tools: ToolSetup = field(default_factory=ToolSetup)
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None
    json_answer: bool = False
    schema: dict[str, Any] | None = None
    speculative: bool | None = None  # the request's switch (None: the server's drafter decides)


def request_settings(request: SamplingFields, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The server's flags, then the settings the request sets (validated later, by Sampling).

    Only OpenAI's spellings are translated here: max_completion_tokens, top_k -1 (vLLM's "all")
    and a seed of any 64-bit integer.
    """
    values = {name: getattr(request, name, None) for name in SETTINGS}
    if getattr(request, "max_completion_tokens", None) is not None:
        values["max_tokens"] = request.max_completion_tokens
    if values["top_k"] == -1:
        values["top_k"] = 0
    if isinstance(values["seed"], int) and not isinstance(values["seed"], bool):
        values["seed"] %= 2**63
    if request.n not in (None, 1):
        raise ApiError("only n=1 is supported: send the request again for more", param="n")
    return {**defaults, **{name: value for name, value in values.items() if value is not None}}


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The non-empty stop strings of a request."""
    if stop is None:
        return []
    return [text for text in ([stop] if isinstance(stop, str) else stop) if text]


def requested_thinking(request: ChatCompletionRequest, has_switch: bool) -> bool:
    """enable_thinking from chat_template_kwargs, the top level or reasoning_effort "none"."""
    kwargs = request.chat_template_kwargs or {}
    value: Any = kwargs.get("enable_thinking", request.enable_thinking)
    if value is None and request.reasoning_effort is not None:
        value = request.reasoning_effort != "none"
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ApiError("enable_thinking must be true or false", param="chat_template_kwargs")
    if not value and not has_switch:
        raise ApiError(
            "this model always thinks: its chat template has no enable_thinking switch "
            "(a Thinking-2507 model), so thinking cannot be turned off",
            param="enable_thinking",
        )
    return value


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages the template can render, tool results put in their calls' order."""
    raw = []
    for message in messages:
        item = message.model_dump(exclude_none=True)
        if (
            item["role"] == "tool"
            and "tool_call_id" not in item
            and isinstance(item.get("id"), str)
        ):
            item["tool_call_id"] = item["id"]  # Qwen-Agent's raw mode names it `id`
        if item["role"] == "developer":
            item["role"] = "system"
        for call in item.get("tool_calls") or []:
            call["function"]["arguments"] = template_arguments(call["function"]["arguments"])
        raw.append(item)
    try:
        return normalize_messages(_ordered_results(raw))
    except ToolError as error:
        raise ApiError(str(error), param="messages") from None


def template_arguments(arguments: str | dict[str, Any]) -> str:
    """A call's arguments as the template writes them (`tojson`: ", " and ": ", no escaping),
    so a client that re-spaced the model's call sends back the text the model wrote and the
    prefix cache holds; text that is not a JSON object stays as it was sent."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        if not isinstance(parsed, dict):
            return arguments
        arguments = parsed
    return json.dumps(arguments, ensure_ascii=False)


def _ordered_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run of tool messages in the order of the preceding assistant's calls (the template
    renders results by position, not by id)."""
    ordered: list[dict[str, Any]] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        if message["role"] != "tool":
            ordered.append(message)
            index += 1
            continue
        end = index
        while end < len(messages) and messages[end]["role"] == "tool":
            end += 1
        run = messages[index:end]
        calls = _previous_calls(ordered)
        if not calls:  # as OpenAI: a result must answer a call
            raise ToolError(
                f"messages[{index}]: a message with role 'tool' must answer a preceding "
                "assistant message's tool_calls"
            )
        if all("tool_call_id" in item for item in run):
            results = [ToolResult(item.get("content") or "", item["tool_call_id"]) for item in run]
            by_result = {id(result): item for result, item in zip(results, run, strict=True)}
            run = [by_result[id(result)] for result in order_results(results, calls)]
        ordered += run
        index = end
    return ordered


def _previous_calls(messages: list[dict[str, Any]]) -> list[ToolCall]:
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        return []
    return [
        ToolCall(call.get("id") or "", call["function"]["name"], call["function"]["arguments"], {})
        for call in last.get("tool_calls") or []
    ]


def tool_setup(request: ChatCompletionRequest, grammars: dict[str, Any]) -> ToolSetup:
    """The request's tools and tool_choice, checked; schema-constrained arguments."""
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    try:
        checked = check_tools(tools)
        choice = request.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = choice.model_dump()
        name = tool_choice_name(choice, checked)
    except ToolError as error:
        param = "tool_choice" if "tool_choice" in str(error) else "tools"
        raise ApiError(str(error), param=param) from None
    if name not in ("auto", "none", "required") and not checked:
        raise ApiError("a named tool_choice needs tools", param="tool_choice")
    parallel = request.parallel_tool_calls is not False
    return ToolSetup(checked, name, constrain=True, parallel=parallel, grammars=grammars)


def prepare_chat(state: ModelContext, request: ChatCompletionRequest) -> Prepared:
    """Everything a chat request needs before it is queued."""
    tokenizer = state.tokenizer
    thinking = requested_thinking(request, tokenizer.has_thinking_switch)
    tools = tool_setup(request, state.grammars)
    check_schemas(state, tools)
    ready = prepare_prompt(
        tokenizer,
        chat_messages(request.messages),
        defaults=state.generation_config,
        context_limit=state.context_limit,
        thinking=thinking,
        tools=tools.tools,
        explicit=request_settings(request, state.defaults),
    )
    prepared = Prepared(ready.prompt, ready.sampling, tools, stop_strings(request.stop))
    prepared.speculative = request.speculative
    if request.logprobs:
        prepared.top_logprobs = request.top_logprobs or 0
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        prepared.json_answer = True
        if response_format.type == "json_schema":
            if response_format.json_schema is None:
                raise ApiError(
                    "json_schema response_format needs a json_schema", param="response_format"
                )
            prepared.schema = response_format.json_schema.json_schema or {"type": "object"}
        try:
            answer_template(tokenizer, prepared.schema, state.model.args.vocab_size)
        except ResponseFormatError as error:
            raise ApiError(str(error), param="response_format") from None
    return prepared


def check_schemas(state: ModelContext, tools: ToolSetup) -> None:
    """Compile the tools' argument grammar now (kept for the reply), so a schema llguidance
    cannot read is a 400 naming the tool, never a failure once the reply has started."""
    if not tools.tools or tools.choice == "none" or not tools.constrain:
        return
    vocab = state.model.args.vocab_size
    try:
        argument_grammar(state.tokenizer, tools.tools, tools.choice, vocab, tools.grammars)
    except SchemaError as error:
        for index, tool in enumerate(tools.tools):
            try:
                argument_grammar(state.tokenizer, [tool], "auto", vocab, tools.grammars)
            except SchemaError as its_error:
                param = f"tools[{index}].function.parameters"
                raise ApiError(str(its_error), param=param) from None
        raise ApiError(str(error), param="tools") from None


def overflow_message(context_limit: int, tokens: str, what: str = "messages") -> str:
    """OpenAI's context-overflow sentence (`tokens`: a count, or "at least N")."""
    return (
        f"This model's maximum context length is {context_limit} tokens. However, your {what} "
        f"resulted in {tokens} tokens. Please reduce the length of the {what} "
        "(a reply needs at least one token of room)."
    )
