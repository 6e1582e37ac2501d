"""The tool loop, written once for every view: run a reply's tool calls (each with consent) and
send their results back, until the model answers without a call, a reply is cut off, or the step
budget is spent.

A view passes hooks, as simonw/llm's `chain()` does: `before_call` asks for consent, `on_step`
shows a finished call, `draw` streams a reply, `while_running` wraps a running call (a spinner).
The loop prints nothing and knows no process: it runs calls through any tool box with `find`,
`call` and `tools` (the MCP manager is one), and its consent rules (`allowed`, `allow_always`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qwen3_mlx.tools import ToolCall, ToolResult
from qwen3_mlx.visible import visible, visible_name

if TYPE_CHECKING:
    from qwen3_mlx.events import TurnResult
    from qwen3_mlx.reply import Reply

DECLINED = "The user declined to run this tool call."
CANCELLED = "The user cancelled this tool call (Ctrl-C) before it finished."
ANSWERS = {"y": "yes", "yes": "yes", "n": "no", "no": "no", "a": "always", "always": "always"}
QUESTION = "[y]es / [n]o / [a]lways for this tool"
CONSENT_TRIES = 3
# Finish reasons after which the loop goes on; the others (length, repetition, interrupted) cut
# the reply off, and the person decides what happens next.
GO_ON = ("tool_calls", "stop")


@dataclass(frozen=True)
class ToolOutcome:
    """The text for the model and whether it reports an error (isError, a timeout, a dead server)."""

    text: str
    is_error: bool = False

    def content(self) -> str:
        """The tool message content: errors begin with `Error:` so the model reads them as one."""
        if self.is_error and not self.text.lower().startswith("error"):
            return f"Error: {self.text}"
        return self.text


class ToolBox(Protocol):
    """What the loop runs calls through (McpManager is one)."""

    @property
    def tools(self) -> list[Any]: ...  # each with .label and .function_name

    def find(self, function_name: str) -> Any | None: ...

    def call(self, tool: Any, arguments: dict[str, Any]) -> ToolOutcome: ...


@dataclass
class ToolStep:
    """One call of a reply and what came of it."""

    call: ToolCall
    label: str  # server.tool, or the name the model wrote when no tool has it
    outcome: ToolOutcome
    status: str  # "ran" | "declined" | "cancelled" | "unknown" | "invalid"
    cut_from: int | None = None  # the result's length in characters when it was cut to the budget

    def result(self) -> ToolResult:
        """The tool message for the model."""
        return ToolResult(self.outcome.content(), self.call.id, self.call.name)

    def cut_note(self) -> str | None:
        """The warning for a result cut to the budget, naming the tool (None: not cut)."""
        if self.cut_from is None:
            return None
        return (
            f"the result of {visible_name(self.label)} was {self.cut_from:,} characters: the "
            f"model gets the first {len(self.outcome.text):,} and a note that it was cut"
        )

    def record(self) -> dict[str, Any]:
        """The step for `prompt --json`."""
        return {
            "tool": self.label,
            "arguments": self.call.arguments,
            "status": self.status,
            "is_error": self.outcome.is_error,
            "result": self.outcome.text,
        }


@dataclass
class LoopEnd:
    """How a loop ended: the last reply's result, every round's steps, and whether the step
    budget stopped it (the reply then still holds calls nobody ran)."""

    result: TurnResult | None
    rounds: list[list[ToolStep]] = field(default_factory=list)
    out_of_steps: bool = False
    tools_off: bool = False  # the reply made calls while the tools were switched off


def shown_call(label: str, call: ToolCall) -> str:
    """`server.tool({"a": 1})`: the call as a person reads it, safe for a terminal."""
    arguments = json.dumps(call.arguments, ensure_ascii=False) if call.arguments else ""
    return f"{visible_name(label)}({visible(arguments)})"


def consent_question(label: str, call: ToolCall) -> str:
    """`server.tool(args) [y]es / [n]o / [a]lways for this tool? `"""
    return f"{shown_call(label, call)} {QUESTION}? "


def parse_answer(line: str) -> str | None:
    """'yes', 'no' or 'always' for a typed answer; None when it is none of them."""
    return ANSWERS.get(line.strip().lower())


def ask_consent(
    question: str, read: Callable[[str], str | None], retry: Callable[[str], None]
) -> str:
    """Ask up to three times: read(question) gives a line (None: no answer, which means no)."""
    for _ in range(CONSENT_TRIES):
        line = read(question)
        if line is None:
            return "no"
        answer = parse_answer(line)
        if answer is not None:
            return answer
        retry("answer y, n or a")
    return "no"


def cut_text(text: str, budget: int) -> tuple[str, bool]:
    """The text cut to `budget` characters, with a marker saying how much was left out."""
    if len(text) <= budget:
        return text, False
    return (
        f"{text[:budget]}\n[… cut: {len(text):,} characters in all, the first {budget:,} shown]",
        True,
    )


@dataclass
class ToolLoop:
    """One view's way of running the loop: its tool box, consent rules and hooks."""

    toolbox: ToolBox
    consent: Any  # .allowed(tool) -> bool, .allow_always(tool)
    before_call: Callable[[Any, ToolCall], str]  # "yes", "no" or "always", when consent says ask
    on_step: Callable[[ToolStep], None] = lambda step: None
    while_running: Callable[[str], AbstractContextManager] = lambda label: nullcontext()
    max_steps: int = 8
    # Characters one result may take; chain() makes it the context's length in tokens, about a
    # quarter of the window at ~4 characters a token: a tool that returns megabytes costs the
    # model part of its context, never the conversation.
    result_budget: int = 1 << 20

    def chain(
        self,
        chat: Any,
        result: TurnResult | None,
        draw: Callable[[Callable[[], Reply]], Any],
        *,
        enabled: bool = True,
    ) -> LoopEnd:
        """Run the calls of `result` and draw each next reply (draw(start) -> TurnResult or None)
        until one has no call to run; the chat is driven through send_tool_results."""
        self.result_budget = int(chat.context_limit)
        end = LoopEnd(result)
        while end.result is not None and end.result.tool_calls:
            if end.result.finish_reason not in GO_ON:
                break
            if not enabled:
                end.tools_off = True
                break
            if len(end.rounds) >= self.max_steps:
                end.out_of_steps = True
                break
            steps = self.run_calls(end.result.tool_calls)
            end.rounds.append(steps)
            results = [step.result() for step in steps]
            end.result = draw(functools.partial(chat.send_tool_results, results))
        return end

    def run_calls(self, calls: Iterable[ToolCall]) -> list[ToolStep]:
        """Ask for (or find) consent for each valid call, run the allowed ones, return the steps.

        Ctrl-C during a call cancels it and the calls after it; the steps still answer every call.
        """
        steps: list[ToolStep] = []
        cancelled = False
        for call in calls:
            step = self._step(call, cancelled)
            cancelled = cancelled or step.status == "cancelled"
            steps.append(step)
            self.on_step(step)
        return steps

    def _step(self, call: ToolCall, cancelled: bool) -> ToolStep:
        if not call.valid:
            message = f"the call was not run: {call.error}; write it as valid JSON"
            return ToolStep(call, call.name or "?", ToolOutcome(message, True), "invalid")
        tool = self.toolbox.find(call.name)
        if tool is None:
            names = ", ".join(t.function_name for t in self.toolbox.tools) or "none"
            outcome = ToolOutcome(
                f"there is no tool named {call.name!r} (the tools: {names})", True
            )
            return ToolStep(call, call.name, outcome, "unknown")
        if cancelled:
            return ToolStep(call, tool.label, ToolOutcome(CANCELLED), "cancelled")
        answer = "yes" if self.consent.allowed(tool) else self.before_call(tool, call)
        if answer == "always":
            self.consent.allow_always(tool)
        if answer == "no":
            return ToolStep(call, tool.label, ToolOutcome(DECLINED), "declined")
        try:
            with self.while_running(tool.label):
                outcome = self.toolbox.call(tool, call.arguments or {})
        except KeyboardInterrupt:
            return ToolStep(call, tool.label, ToolOutcome(CANCELLED), "cancelled")
        text, was_cut = cut_text(outcome.text, self.result_budget)
        if not was_cut:
            return ToolStep(call, tool.label, outcome, "ran")
        cut = ToolOutcome(text, outcome.is_error)
        return ToolStep(call, tool.label, cut, "ran", cut_from=len(outcome.text))
