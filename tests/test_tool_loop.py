"""The tool loop on its own (qwen3_mlx/tool_loop.py): no model, no MCP process, no terminal. A
fake tool box and chat show the policy both views share: which replies go on, the step budget,
consent asked at most three times, Ctrl-C cancelling the calls after it, and the result budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from qwen3_mlx.tool_loop import (
    CANCELLED,
    DECLINED,
    ToolLoop,
    ToolOutcome,
    ask_consent,
    consent_question,
)
from qwen3_mlx.tools import ToolCall


def call(name: str = "box-echo", index: int = 0) -> ToolCall:
    return ToolCall(f"call_{index}", name, '{"text": "hi"}', {"text": "hi"})


@dataclass
class Box:
    """A tool box with one tool, `echo`; `reply` is what each call returns."""

    reply: str = "hi back"
    interrupt: bool = False
    calls: list = field(default_factory=list)

    @property
    def tools(self) -> list:
        return [SimpleNamespace(label="box.echo", function_name="box-echo")]

    def find(self, name: str):
        return self.tools[0] if name == "box-echo" else None

    def call(self, tool, arguments) -> ToolOutcome:
        self.calls.append(arguments)
        if self.interrupt:
            raise KeyboardInterrupt
        return ToolOutcome(self.reply)


class Rules:
    def __init__(self, allow: bool = True):
        self.allow = allow

    def allowed(self, tool) -> bool:
        return self.allow

    def allow_always(self, tool) -> None:
        self.allow = True


def result(*calls: ToolCall, finish: str = "tool_calls"):
    return SimpleNamespace(tool_calls=calls, finish_reason=finish)


class Chat:
    """Answers every tool result with `next_result`, recording what it was sent."""

    context_limit = 100

    def __init__(self, next_result):
        self.next_result = next_result
        self.sent: list = []

    def send_tool_results(self, results):
        self.sent.append(results)
        return self.next_result


def draw(start):
    return start()  # a reply is its result here


def test_the_loop_runs_calls_until_a_reply_has_none_and_stops_at_the_budget() -> None:
    box = Box()
    loop = ToolLoop(box, Rules(), lambda tool, c: "no", max_steps=3)
    answered = Chat(result(finish="stop"))
    end = loop.chain(answered, result(call()), draw)
    assert [len(round_) for round_ in end.rounds] == [1] and not end.out_of_steps
    assert answered.sent[0][0].content == "hi back"
    endless = Chat(result(call()))
    end = loop.chain(endless, result(call()), draw)
    assert len(end.rounds) == 3 and end.out_of_steps and len(box.calls) == 4
    # A reply cut off (length, repetition, Ctrl-C) or made with the tools off runs nothing.
    for cut in ("length", "repetition", "interrupted"):
        assert loop.chain(endless, result(call(), finish=cut), draw).rounds == []
    assert loop.chain(endless, result(call()), draw, enabled=False).tools_off


def test_consent_is_asked_three_times_at_most_and_no_answer_is_no() -> None:
    lines, retries = iter(["maybe", "later", "what?", "y"]), []
    assert ask_consent("q? ", lambda q: next(lines), retries.append) == "no"
    assert retries == ["answer y, n or a"] * 3
    assert ask_consent("q? ", lambda q: None, retries.append) == "no"
    assert ask_consent("q? ", lambda q: " A\n", retries.append) == "always"
    shown = consent_question("box.e\x1b[2Kcho", call())
    assert shown == 'box.e\\x1b[2Kcho({"text": "hi"}) [y]es / [n]o / [a]lways for this tool? '


def test_declines_ctrl_c_unknown_tools_and_cut_results_are_steps_the_model_reads() -> None:
    seen = []
    loop = ToolLoop(Box(interrupt=True), Rules(), lambda tool, c: "yes", on_step=seen.append)
    steps = loop.run_calls([call(index=0), call(index=1), call("nope", 2)])
    assert [step.status for step in steps] == ["cancelled", "cancelled", "unknown"]
    assert steps[1].outcome.text == CANCELLED and seen == steps
    asked = ToolLoop(Box(), Rules(allow=False), lambda tool, c: "no")
    (declined,) = asked.run_calls([call()])
    assert declined.status == "declined" and declined.result().content == DECLINED
    big = ToolLoop(Box(reply="x" * 500), Rules(), lambda tool, c: "yes", result_budget=100)
    (cut,) = big.run_calls([call()])
    assert cut.outcome.text.endswith("[… cut: 500 characters in all, the first 100 shown]")
    assert cut.cut_from == 500 and "box.echo was 500 characters" in cut.cut_note()
