"""The mcpServers config: the formats other clients write, and one-line errors naming file and server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen3_mlx.cli.commands import parse_line
from qwen3_mlx.mcp import Consent, McpConfigError, McpTool, parse_mcp_config, read_mcp_config
from qwen3_mlx.mcp.naming import find_tool, function_name, named_tools
from qwen3_mlx.mcp.results import ToolOutcome, outcome_from_result

# The Qwen3 model card's own example.
MODEL_CARD = {
    "mcpServers": {
        "time": {"command": "uvx", "args": ["mcp-server-time", "--local-timezone=Asia/Shanghai"]},
        "fetch": {"command": "uvx", "args": ["mcp-server-fetch"]},
    }
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_the_model_card_example_parses(tmp_path: Path) -> None:
    time_server, fetch = read_mcp_config(write(tmp_path, MODEL_CARD))
    assert time_server.name == "time" and time_server.command == "uvx"
    assert time_server.args == ("mcp-server-time", "--local-timezone=Asia/Shanghai")
    assert time_server.transport == "stdio" and fetch.name == "fetch"


def test_stdio_and_remote_fields() -> None:
    local, remote, sse = parse_mcp_config(
        {
            "mcpServers": {
                "local": {
                    "command": "srv",
                    "env": {"K": "v"},
                    "cwd": "/tmp",
                    "timeout": 5,
                    "startup_timeout": 2.5,
                    "autoApprove": [],  # another client's key: ignored
                },
                "remote": {"url": "https://x.test/mcp", "headers": {"Authorization": "Bearer t"}},
                "events": {"url": "http://x.test/sse", "type": "sse"},
            }
        }
    )
    assert local.env == {"K": "v"} and local.cwd == "/tmp"
    assert local.call_timeout == 5 and local.startup_timeout == 2.5
    assert remote.transport == "streamable-http" and remote.headers["Authorization"] == "Bearer t"
    assert sse.transport == "sse"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON (Expecting property name"),
        ({"servers": {}}, 'expected {"mcpServers"'),
        ({"mcpServers": {"a": {"args": ["x"]}}}, "server 'a': needs a command (stdio) or a url"),
        ({"mcpServers": {"a": {"command": "x", "args": "y"}}}, "args must be a list of strings"),
        ({"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}, "env must be an object"),
        ({"mcpServers": {"a": {"url": "ftp://x"}}}, "url must be an http:// or https://"),
        ({"mcpServers": {"a": {"url": "http://x", "type": "ws"}}}, "type must be one of"),
        ({"mcpServers": {"a": {"command": "x", "timeout": 0}}}, "timeout must be a positive"),
        ({"mcpServers": {"a": {"command": "x", "url": "http://x"}}}, "not both"),
    ],
)
def test_bad_configs_get_one_line_errors(tmp_path: Path, data: object, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(McpConfigError) as caught:
        read_mcp_config(path)
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(McpConfigError, match="mcp.json: cannot be read"):
        read_mcp_config(tmp_path / "mcp.json")


def test_function_names_are_valid_and_unique() -> None:
    assert function_name("time", "get_current_time") == "time-get_current_time"
    assert function_name("my server", "a.b") == "my_server-a_b"
    long = function_name("s" * 40, "t" * 40)
    assert len(long) == 64
    tools = named_tools([McpTool("a b", "x", ""), McpTool("a.b", "x", "")])
    assert [t.function_name for t in tools] == ["a_b-x", "a_b-x_2"]
    assert tools[0].label == "a b.x"
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {}}}
    function = McpTool("s", "t", "d", schema, "s-t").function()["function"]
    assert function["parameters"] == schema  # the full schema, $defs included


def test_a_call_by_the_bare_tool_name_finds_it_only_when_one_server_has_it() -> None:
    tools = named_tools(
        [McpTool("notes", "lookup", ""), McpTool("time", "now", ""), McpTool("web", "now", "")]
    )
    assert find_tool(tools, "notes-lookup").label == "notes.lookup"
    assert find_tool(tools, "lookup").label == "notes.lookup"  # the prefix dropped: not ambiguous
    assert find_tool(tools, "time-now").label == "time.now"
    assert find_tool(tools, "now") is None  # two servers have it: the model must say which
    assert find_tool(tools, "nope") is None


def test_consent_rules() -> None:
    tool = McpTool("time", "get_current_time", "")
    assert not Consent().allowed(tool)
    assert Consent(yes=True).allowed(tool)
    assert Consent(["time.*"]).allowed(tool) and not Consent(["fetch.*"]).allowed(tool)
    consent = Consent()
    consent.allow_always(tool)
    assert consent.allowed(tool) and not consent.allowed(McpTool("time", "convert_time", ""))


def test_allow_list_entries_with_dots_in_names_are_read_one_way_only() -> None:
    files_read = McpTool("files", "read.all", "")  # label files.read.all
    other = McpTool("files.read", "all", "")  # the same label, another server
    servers = ["files", "files.read"]
    # server/tool splits at the last slash, each side its own pattern.
    consent = Consent(["files/read.*"], servers=servers)
    assert consent.allowed(files_read) and not consent.allowed(other)
    assert Consent(["files.read/*"], servers=servers).allowed(other)
    assert not Consent(["files.read/*"], servers=servers).allowed(files_read)
    # The old dotted form: ambiguous between two servers, it allows nothing and says why ...
    ambiguous = Consent(["files.read.*"], servers=servers)
    assert not ambiguous.allowed(files_read) and not ambiguous.allowed(other)
    (problem,) = ambiguous.problems
    assert "'files.read.*' allows nothing" in problem and "'files/read.*'" in problem
    # ... and with one server it can name, it means that server.
    assert Consent(["files.read.*"], servers=["files"]).allowed(files_read)
    assert not Consent(["files.*"], servers=servers).allowed(other)
    assert Consent(["*"], servers=servers).allowed(other)  # no server named: the whole label


def test_results_are_text_errors_and_summaries() -> None:
    from mcp.types import CallToolResult, ImageContent, TextContent

    text = CallToolResult(content=[TextContent(type="text", text="12:00")])
    assert outcome_from_result(text) == ToolOutcome("12:00")
    error = CallToolResult(content=[TextContent(type="text", text="bad zone")], is_error=True)
    assert outcome_from_result(error).content() == "Error: bad zone"
    image = CallToolResult(
        content=[ImageContent(type="image", data="aGVsbG8=", mime_type="image/png")]
    )
    assert outcome_from_result(image).text == "[image: image/png, 5 bytes, not shown to the model]"
    structured = CallToolResult(content=[], structured_content={"a": 1})
    assert outcome_from_result(structured).text == '{"a": 1}'


def test_the_tools_command_parses() -> None:
    assert parse_line("/tools").name == "tools"
    assert parse_line("/tools OFF").argument == "off"
    assert parse_line("/tools maybe").kind == "hint"
