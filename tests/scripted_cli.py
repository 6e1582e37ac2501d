"""Run the CLI with a scripted model instead of a checkpoint, for pty tests of the views:
`python tests/scripted_cli.py chat ...`. The model calls the tool its user message names
(`call NAME {json}`) and answers `done.` to a tool response."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def script(user: str) -> str:
    """A call for `call NAME {json}`, `done.` after a tool response, else a short answer."""
    if user.startswith("<tool_response>"):
        return "<think>\nOk.\n</think>\n\ndone.<|im_end|>"
    if user.startswith("call "):
        _, name, arguments = user.split(" ", 2)
        call = json.dumps({"name": name, "arguments": json.loads(arguments)})
        return f"<think>\nA tool.\n</think>\n\n<tool_call>\n{call}\n</tool_call><|im_end|>"
    return "<think>\nHm.\n</think>\n\nhello.<|im_end|>"


def main() -> None:
    """Patch the chat the options open, then run the app on argv."""
    from chat_fakes import ScriptedModel, load_fixture_tokenizer

    from qwen3_mlx.chat import Chat
    from qwen3_mlx.cli import options
    from qwen3_mlx.cli.app import app
    from qwen3_mlx.generation_config import GenerationConfig

    def open_chat(spec: options.SessionSpec) -> Chat:
        tokenizer = load_fixture_tokenizer("qwen3-4b")
        model = ScriptedModel(tokenizer, script)
        return Chat(model, tokenizer, GenerationConfig(), model_id="scripted")

    options.SessionSpec.open_chat = open_chat  # type: ignore[method-assign]
    app(prog_name="qwen3-mlx")


if __name__ == "__main__":
    main()
