"""Text a tool server wrote, made safe to show on a terminal.

A server chooses its tool names, descriptions, results and stderr lines. Written raw to a terminal,
an escape sequence in them could retitle the window, erase the consent line and draw a trusted
one over it, or make the terminal type into our input (`ESC [ 6 n` asks it to report the cursor).
Every view passes such text through `visible` (text) or `visible_name` (a name on one line):
control characters become their escapes (`\\x1b`), so what is shown is what was sent.
"""

from __future__ import annotations

import unicodedata

# Bidirectional overrides and isolates reorder what follows them: a name could read backwards.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


_SHORT = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape(character: str) -> str:
    if character in _SHORT:
        return _SHORT[character]
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """The text with every control character but newline and tab shown as its escape."""
    if text.isprintable():
        return text  # the common case: nothing to do
    return "".join(
        _escape(character)
        if character not in "\n\t"
        and (unicodedata.category(character) == "Cc" or character in _BIDI)
        else character
        for character in text
    )


def visible_name(name: str) -> str:
    """A name (tool, server) on one line: only printable characters, the rest as escapes."""
    if name.isprintable():
        return name
    return "".join(
        character if character.isprintable() or character == " " else _escape(character)
        for character in name
    )
