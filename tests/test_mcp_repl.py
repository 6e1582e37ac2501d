"""Tool calls with consent: the REPL (pipe reader) and `prompt`, over a scripted model and the real
mcp-server-time. No call runs without a yes, an `always`, --yes or an allow-list entry."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from chat_fakes import ScriptedModel, load_fixture_tokenizer
from rich.console import Console
from typer.testing import CliRunner

from qwen3_mlx.chat import Chat
from qwen3_mlx.cli.app import app
from qwen3_mlx.cli.line_input import pipe_reader
from qwen3_mlx.cli.repl import Repl
from qwen3_mlx.cli.tool_steps import ToolSession
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.mcp import Consent, McpManager, parse_mcp_config
from qwen3_mlx.tool_loop import DECLINED

TIME = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone=UTC"]}
CALL = (
    '<tool_call>\n{"name": "time-get_current_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
)
QUESTION = 'time.get_current_time({"timezone": "UTC"}) [y]es / [n]o / [a]lways for this tool?'
pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")


def agent(user: str) -> str:
    """Call the time tool for a question; answer once a tool response (or a refusal) is back."""
    if user.startswith("<tool_response>"):
        if "declined" in user:
            return "<think>\nNo tool.\n</think>\n\nI may not check the time.<|im_end|>"
        return "<think>\nGot it.\n</think>\n\nIt is daytime in UTC.<|im_end|>"
    return f"<think>\nI need the clock.\n</think>\n\n{CALL}<|im_end|>"


def endless(user: str) -> str:
    return f"<think>\nAgain.\n</think>\n\n{CALL}<|im_end|>"


def make_chat(script=agent) -> Chat:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    return Chat(
        ScriptedModel(tokenizer, script), tokenizer, GenerationConfig(), sampling={"temperature": 0}
    )


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory):
    with McpManager(
        parse_mcp_config({"mcpServers": {"time": TIME}}), log_dir=tmp_path_factory.mktemp("logs")
    ) as manager:
        assert manager.wait_started() == []
        yield manager


def run_repl(
    manager: McpManager,
    lines: str,
    script=agent,
    max_steps: int = 8,
    answers: str | None = None,
    **consent,
):
    """Messages from `lines`; consent answers, one a line, from `answers` as from a terminal
    (None: stdin is a pipe and no one is asked)."""
    chat = make_chat(script)
    session = ToolSession(manager, Consent(**consent), max_steps)
    session.switch(chat, True)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    ask_line = None
    if answers is not None:
        typed = iter(answers.splitlines())

        def ask_line(question: str) -> str:
            out.write(question + "\n")
            line = next(typed, None)
            if line is None:
                raise EOFError
            return line

    reader = pipe_reader(io.StringIO(lines))
    Repl(chat, console, reader, tools=session, ask_line=ask_line).run()
    return chat, out.getvalue()


def tool_messages(chat: Chat) -> list[str]:
    return [m["content"] for m in chat.messages if m["role"] == "tool"]


def test_yes_runs_the_call_and_the_model_answers(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time is it?\n", answers="y")
    assert QUESTION in out
    assert "← time.get_current_time:" in out and "It is daytime in UTC." in out
    (result,) = tool_messages(chat)
    assert '"timezone": "UTC"' in result


def test_no_declines_and_the_model_is_told(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time is it?\n", answers="n")
    assert QUESTION in out and "declined" in out
    assert tool_messages(chat) == [DECLINED]
    assert "I may not check the time." in out


def test_always_asks_once_per_tool(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time?\nand now?\n", answers="a")
    assert out.count(QUESTION) == 1
    assert len(tool_messages(chat)) == 2 and DECLINED not in tool_messages(chat)


def test_end_of_input_at_the_question_declines(manager: McpManager) -> None:
    chat, _ = run_repl(manager, "what time?\n", answers="")
    assert tool_messages(chat) == [DECLINED]


def test_piped_input_is_never_taken_for_consent(manager: McpManager) -> None:
    # No terminal, no question: the piped `a` is the next message, not an "always".
    chat, out = run_repl(manager, "what time?\na\n")
    assert QUESTION not in out and tool_messages(chat) == [DECLINED, DECLINED]
    assert "declined: stdin is not a terminal" in out
    assert [turn.user for turn in chat.turns if turn.user] == ["what time?", "a"]


def test_the_allow_list_and_yes_skip_the_question(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time?\n", allow=["time.*"])
    assert QUESTION not in out and "DECLINED" not in out and len(tool_messages(chat)) == 1
    chat, out = run_repl(manager, "what time?\n", yes=True)
    assert QUESTION not in out and '"timezone": "UTC"' in tool_messages(chat)[0]


def test_the_loop_stops_at_the_step_limit(manager: McpManager) -> None:
    chat, out = run_repl(manager, "loop\n", script=endless, max_steps=2, yes=True)
    assert len(tool_messages(chat)) == 2
    assert "stopped after 2 tool steps (--max-tool-steps 2)" in out


def test_tools_command_lists_and_switches(manager: McpManager) -> None:
    chat, out = run_repl(manager, "/tools\n/tools off\nwhat time?\n/tools on\n")
    assert "2 tools from time" in out and "time.get_current_time" in out
    assert "tools on: 2 tools from time" in out and len(chat.tools) == 2
    assert "Get current time in a specific timezone" in out
    # Off, the model is given no tools: what it writes is not parsed as a call, and nothing runs.
    assert "tools off: 2 tools from time (off)" in out and QUESTION not in out
    assert tool_messages(chat) == []


def run_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    stdin: str = "",
    servers: dict | None = None,
    script=agent,
):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": servers or {"time": TIME}}))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    chat = lambda spec: make_chat(script)  # noqa: E731
    monkeypatch.setattr("qwen3_mlx.cli.options.SessionSpec.open_chat", chat)
    command = [*args[:1], "--model", "scripted", "--mcp-config", str(config), *args[1:]]
    return CliRunner().invoke(app, command, input=stdin)


def run_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    return run_cli(tmp_path, monkeypatch, "prompt", *args, "what time?")


def test_chat_fed_by_a_pipe_asks_nothing_and_declines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_cli(tmp_path, monkeypatch, "chat", stdin="what time?\na\n")
    assert result.exit_code == 0, result.output
    assert QUESTION not in result.output
    said = " ".join(result.output.split())  # the console wraps at 80 columns
    assert said.count("declined: stdin is not a terminal") == 2


def test_prompt_with_yes_runs_the_call_and_json_has_the_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_prompt(tmp_path, monkeypatch, "--yes", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["answer"] == "It is daytime in UTC."
    ((step,),) = body["tool_steps"]
    assert step["tool"] == "time.get_current_time" and step["status"] == "ran"
    assert '"timezone": "UTC"' in step["result"]
    logs = tmp_path / "xdg_state_home" / "qwen3-mlx" / "mcp-time.log"
    assert logs.is_file()


def test_prompt_without_consent_declines_and_says_so_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_prompt(tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "I may not check the time."
    assert "declined: prompt runs tools only with --yes" in result.stderr


def test_save_and_load_keep_the_tool_loop_and_render_the_same_prompt(
    manager: McpManager, tmp_path: Path
) -> None:
    from qwen3_mlx.engine import render_prompt

    saved = tmp_path / "loop.json"
    chat, out = run_repl(manager, f"what time is it?\n/save {saved}\n", answers="y")
    assert "saved" in out
    again, out = run_repl(manager, f"/load {saved}\n")
    assert "loaded" in out and "1 exchange" in out
    assert again.messages == chat.messages and again.turns == chat.turns
    (call,) = [m for m in again.messages if m.get("tool_calls")]
    assert call["tool_calls"][0]["function"]["name"] == "time-get_current_time"
    assert len(tool_messages(again)) == 1 and '"timezone": "UTC"' in tool_messages(again)[0]

    def prompt(chat: Chat) -> list[int]:
        return render_prompt(
            chat.tokenizer, chat.messages, thinking=chat.thinking, tools=chat.tools
        )

    assert prompt(again) == prompt(chat)
    assert "<tool_response>" in chat.tokenizer.decode(prompt(again))


def test_a_huge_description_and_a_huge_result_are_cut_and_the_tool_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 27, Medium 11: a 1 MB description no longer fails every prompt, and a 3 MB result
    is cut to the budget with a warning that names the tool."""
    from scripted_cli import script

    hostile = {
        "command": sys.executable,
        "args": [str(Path(__file__).parent / "fixtures" / "mcp" / "hostile_server.py")],
        "env": {"HOSTILE_BIG": "1"},
    }
    result = run_cli(
        tmp_path,
        monkeypatch,
        "prompt",
        "--yes",
        "--json",
        'call hostile-flood {"path": "/big"}',
        servers={"hostile": hostile},
        script=script,
    )
    assert result.exit_code == 0, result.output
    warnings = " ".join(result.stderr.split())
    assert "MCP tool hostile.oracle: its description is 1,080,000 characters" in warnings
    assert "the result of hostile.flood was 3,000,000 characters" in warnings
    body = json.loads(result.stdout)
    assert body["answer"] == "done."
    ((step,),) = body["tool_steps"]
    assert step["result"].endswith("[… cut: 3,000,000 characters in all, the first 4,096 shown]")
