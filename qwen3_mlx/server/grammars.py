"""The server's compiled tool grammars, kept for reuse with a bound.

A compiled grammar takes 1 to 11 MB, and agents whose tool list changes per request (per-user
tools, a date in a description) would otherwise add one for every request until the server runs
out of memory. The most recently used ones are kept; a tool set dropped is compiled again when it
comes back. The tool sets' grammars (ServerState.grammars) and the response_format answers'
(processors.answer_template) are both kept here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

MAX_GRAMMARS = 16


class GrammarCache:
    """A dict-like LRU of compiled grammars by key, safe to use from the reply threads."""

    def __init__(self, max_entries: int = MAX_GRAMMARS):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The grammar of `key` (made the most recent), or None."""
        with self._lock:
            grammar = self._entries.get(key)
            if grammar is not None:
                self._entries.move_to_end(key)
            return grammar

    def __setitem__(self, key: Hashable, grammar: Any) -> None:
        with self._lock:
            self._entries[key] = grammar
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
