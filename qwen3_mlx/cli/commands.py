"""The chat REPL's slash commands: one plain function turns a typed line into an Action.

Nothing here knows prompt_toolkit, rich or the model, so every rule is testable on strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3_mlx.errors import SettingsError
from qwen3_mlx.settings import SETTING_ALIASES, SETTINGS

# name -> (usage, one-line help); the order is the order of /help.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("/help", "show the commands"),
    "think": ("/think", "thinking on (hard switch; also the thinking sampling preset)"),
    "no_think": ("/no_think", "thinking off (hard switch; also the non-thinking preset)"),
    "system": (
        "/system [text|none]",
        "show, set or clear (none) the system prompt; keeps the conversation",
    ),
    "reset": ("/reset", "forget the conversation (keeps the system prompt and settings)"),
    "undo": ("/undo", "drop the last question and its answer"),
    "retry": ("/retry", "ask the last question again for a new answer"),
    "save": ("/save [file]", "save the conversation: JSON transcript plus a Markdown copy"),
    "load": ("/load file", "continue a saved conversation"),
    "set": (
        "/set name value|default",
        "change a sampling setting: " + " ".join(s.label for s in SETTINGS.values()),
    ),
    "settings": ("/settings", "show the sampling settings in use"),
    "context": ("/context", "tokens used of the context window"),
    "stats": ("/stats", "details of the last reply: tokens, speed, memory"),
    "thinking": ("/thinking show|hide", "show the reasoning in full, or collapse it to one line"),
    "tools": ("/tools [off|on]", "list the MCP tools with their descriptions, or switch them"),
    "exit": ("/exit", "leave (also Ctrl-D)"),
}
ALIASES = {"quit": "exit", "q": "exit", "?": "help", "nothink": "no_think"}

THINKING_VIEWS = ("show", "hide")
TOOLS_SWITCH = ("off", "on")
NEEDS_ARGUMENT = {"load", "set", "thinking"}
TAKES_ARGUMENT = NEEDS_ARGUMENT | {"system", "save", "tools"}


@dataclass(frozen=True)
class Action:
    """What a typed line asks for: send a message, run a command, show a hint, or nothing."""

    kind: str  # "send" | "command" | "hint" | "nothing"
    name: str = ""  # the command, for kind == "command"
    argument: str = ""  # the command's argument text
    text: str = ""  # the message (send) or the hint (hint)
    value: int | float | None = None  # the value of /set, checked against the settings record


def hint(text: str) -> Action:
    """An Action that only shows text."""
    return Action("hint", text=text)


def parse_line(line: str) -> Action:
    """Decide what a line of input means. `//x` sends `/x`; an unknown /word is never sent."""
    stripped = line.strip()
    if not stripped:
        return Action("nothing")
    if stripped.startswith("//"):
        return Action("send", text=stripped[1:])
    if not stripped.startswith("/"):
        return Action("send", text=line.strip("\n"))
    word, _, rest = stripped[1:].partition(" ")
    word, rest = word.strip(), rest.strip()
    if "\n" in word:
        word, _, more = word.partition("\n")
        rest = (more + " " + rest).strip()
    name = ALIASES.get(word.lower(), word.lower())
    if name in ("think", "no_think") and rest:
        # A soft switch at the start of a message is part of the message; the model reads it.
        return Action("send", text=line.strip("\n"))
    if name not in COMMANDS:
        return hint(
            f"Unknown command /{word}. /help lists the commands; start a line with // to send a '/'."
        )
    if "\n" in rest:
        return hint(f"/{word} takes one line.")
    if rest and name not in TAKES_ARGUMENT:
        return hint(f"/{word} takes no argument. Usage: {COMMANDS[name][0]}")
    if not rest and name in NEEDS_ARGUMENT:
        return hint(f"Usage: {COMMANDS[name][0]}")
    if name == "set":
        return _parse_set(rest)
    if name == "thinking" and rest.lower() not in THINKING_VIEWS:
        return hint(f"Usage: {COMMANDS['thinking'][0]}")
    if name == "tools" and rest and rest.lower() not in TOOLS_SWITCH:
        return hint(f"Usage: {COMMANDS['tools'][0]}")
    if name in ("thinking", "tools"):
        rest = rest.lower()
    return Action("command", name=name, argument=rest)


def _parse_set(rest: str) -> Action:
    parts = rest.split()
    if len(parts) != 2:
        return hint(f"Usage: {COMMANDS['set'][0]}")
    key = SETTING_ALIASES.get(parts[0].lower())
    if key is None:
        names = ", ".join(s.label for s in SETTINGS.values())
        return hint(f"Unknown setting {parts[0]!r}; choose one of: {names}")
    if parts[1].lower() == "default":
        return Action("command", name="unset", argument=key)
    try:
        value = SETTINGS[key].validate(parts[1])
    except SettingsError as error:
        return hint(str(error))
    return Action("command", name="set", argument=key, value=value)


def help_text() -> str:
    """The /help table as plain lines."""
    width = max(len(usage) for usage, _ in COMMANDS.values())
    lines = [f"  {usage:<{width}}  {text}" for usage, text in COMMANDS.values()]
    lines.append(f"  {'//text':<{width}}  send a message that starts with '/'")
    lines.append("  Alt+Enter (or Esc, Enter) adds a new line; Ctrl-C stops a reply; Ctrl-D quits.")
    return "\n".join(lines)


def completions(text_before_cursor: str) -> list[str]:
    """Words that complete what was typed: command names, /set names, show|hide."""
    if not text_before_cursor.startswith("/") or "\n" in text_before_cursor:
        return []
    word, space, rest = text_before_cursor[1:].partition(" ")
    if not space:
        return [f"/{name}" for name in COMMANDS if name.startswith(word.lower())]
    if " " in rest:
        return []
    name = ALIASES.get(word.lower(), word.lower())
    choices: tuple[str, ...] = ()
    if name == "set":
        choices = tuple(SETTINGS)
    elif name == "thinking":
        choices = THINKING_VIEWS
    elif name == "tools":
        choices = TOOLS_SWITCH
    return [choice for choice in choices if choice.startswith(rest.lower())]
