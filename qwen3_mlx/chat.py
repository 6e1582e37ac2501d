"""The chat session: history, system prompt, thinking switch, sampling settings and KV-cache reuse.

`Chat.send(text)` returns a Reply: iterate it for ThinkingText and AnswerText pieces, then read
`reply.result` (a TurnResult). History is an explicit list of turns; the KV cache is only an
accelerator: it remembers the exact tokens it holds, and each turn reuses the longest common
prefix with the newly rendered prompt.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen3_mlx.cache import PromptCache, kv_bytes_per_token
from qwen3_mlx.engine import ToolSetup, prepare_prompt, start_reply
from qwen3_mlx.errors import HistoryError, TemplateError
from qwen3_mlx.events import TurnResult
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.history import Turn, history_messages
from qwen3_mlx.limits import available_memory
from qwen3_mlx.model import CausalLM
from qwen3_mlx.reply import Reply
from qwen3_mlx.rope_auto import RopeAuto, switch
from qwen3_mlx.settings import (
    GreedyThinkingWarning,
    Sampling,
    setting_name,
    validate_overrides,
    validate_setting,
)
from qwen3_mlx.speculative import DraftSpec, Speculation
from qwen3_mlx.stream import RepetitionGuard
from qwen3_mlx.thinking import thinking_active
from qwen3_mlx.tokenizer import IM_END_ID, Tokenizer
from qwen3_mlx.tools import (
    ToolResult,
    check_tools,
    order_results,
    tool_choice_name,
)
from qwen3_mlx.transcript import TranscriptData, read_transcript, write_transcript


class Chat:
    """One conversation with one model: drive it with send(), retry(), undo() and reset()."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        generation_config: GenerationConfig,
        *,
        model_id: str = "",
        system: str | None = None,
        thinking: bool = True,
        sampling: dict[str, Any] | None = None,
        context_length: int | None = None,
        repetition_guard: RepetitionGuard | None = RepetitionGuard(),  # noqa: B008 (frozen)
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = "auto",
        constrain_arguments: bool = False,
        parallel_tool_calls: bool = True,
        kv_bits: int | None = None,
        auto_rope: bool = False,
        speculation: Speculation | None = None,
    ):
        self.model = model
        self.speculation = speculation  # a drafter: replies decode speculatively (speculative.py)
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.model_id = model_id
        self.repetition_guard = repetition_guard
        # --rope-scaling auto: native RoPE until a reply would pass the trained window.
        self.rope_plan = RopeAuto.for_model(model.args) if auto_rope else None
        if self.rope_plan is not None:
            switch(model, self.rope_plan, None)
        limit = self.rope_plan.limit if self.rope_plan else model.args.context_length
        self.context_limit = int(context_length or limit)
        self._system = _clean_system(system)
        self._thinking = True
        self.thinking = thinking
        self._explicit = validate_overrides(sampling)
        self._turns: list[Turn] = []
        self.cache = PromptCache(model, kv_bits)  # the KV cache and the exact tokens it holds
        self._stop_ids = frozenset(generation_config.eos_token_ids) | {IM_END_ID}
        self._active: Reply | None = None
        self._replies = 0
        self._used: tuple[str, int] = ("", 0)
        # A view's hook for a long prefill: called with (tokens done, tokens to do) per chunk.
        self.on_prefill: Callable[[int, int], None] | None = None
        # A view's hook for a one-line notice (the RoPE changed and the conversation re-prefills).
        self.on_notice: Callable[[str], None] = lambda line: None
        self._tool_setup = ToolSetup(constrain=constrain_arguments, parallel=parallel_tool_calls)
        self.tools = tools or []
        self.tool_choice = tool_choice

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        *,
        rope_scaling: dict[str, Any] | None = None,
        compute_dtype: str = "auto",
        load: Callable[..., tuple[Any, Any, Any]] | None = None,
        draft: DraftSpec | None = None,
        **chat_kwargs: Any,
    ) -> Chat:
        """Load a model folder or repo id and open a chat with it (draft: speculative decoding,
        its draft model loaded with the same policy).

        load: the loader (loading.load by default; a front end under mlx.launch passes
        parallel.distributed's rank-0 loader bound to its group).
        """
        if load is None:
            from qwen3_mlx.loading import load

        model, tokenizer, generation_config = load(
            path_or_repo, rope_scaling=rope_scaling, compute_dtype=compute_dtype
        )
        if draft is not None:
            chat_kwargs["speculation"] = draft.build(
                model,
                tokenizer,
                compute_dtype=compute_dtype,
                rope_scaling=rope_scaling,
                kv_bits=chat_kwargs.get("kv_bits"),
            )
        chat_kwargs.setdefault("model_id", str(path_or_repo))
        return cls(model, tokenizer, generation_config, **chat_kwargs)

    # --- state a view reads --------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        """The system prompt (None for none)."""
        return self._system

    @system.setter
    def system(self, value: str | None) -> None:
        self._system = _clean_system(value)

    @property
    def thinking(self) -> bool:
        """The hard thinking switch (enable_thinking)."""
        return self._thinking

    @thinking.setter
    def thinking(self, value: bool) -> None:
        if not value and not self.tokenizer.has_thinking_switch:
            raise TemplateError(
                "this model always thinks: its chat template has no enable_thinking switch "
                "(a Thinking-2507 model), so thinking cannot be turned off"
            )
        self._thinking = bool(value)

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The tools the model may call, in OpenAI's function format (rendered by the template)."""
        return list(self._tool_setup.tools)

    @tools.setter
    def tools(self, value: list[dict[str, Any]] | None) -> None:
        setup = self._tool_setup
        setup.tools = check_tools(value)
        setup.choice = tool_choice_name(setup.choice, setup.tools)

    @property
    def tool_choice(self) -> str:
        """'auto', 'none', 'required', or the name of the function every reply must call."""
        return self._tool_setup.choice

    @tool_choice.setter
    def tool_choice(self, value: Any) -> None:
        self._tool_setup.choice = tool_choice_name(value, self._tool_setup.tools)

    @property
    def constrain_arguments(self) -> bool:
        """Whether call arguments are held to each tool's JSON schema (llguidance)."""
        return self._tool_setup.constrain

    @constrain_arguments.setter
    def constrain_arguments(self, value: bool) -> None:
        self._tool_setup.constrain = bool(value)

    @property
    def parallel_tool_calls(self) -> bool:
        """False: each reply ends after its first tool call."""
        return self._tool_setup.parallel

    @parallel_tool_calls.setter
    def parallel_tool_calls(self, value: bool) -> None:
        self._tool_setup.parallel = bool(value)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The history as the template gets it: answers, and thinking only inside tool loops."""
        return history_messages(self._system, self._turns)

    @property
    def turns(self) -> list[Turn]:
        """The exchanges so far, thinking kept apart, with how each reply ended."""
        return list(self._turns)

    @property
    def settings(self) -> Sampling:
        """The sampling settings the next reply would use (mode preset + explicit values)."""
        thinks = thinking_active(self.messages, self._thinking, self.tokenizer.has_thinking_switch)
        return Sampling.for_mode(self.generation_config, thinks, self._explicit)

    @property
    def explicit_settings(self) -> dict[str, Any]:
        """Only the values the user set; these survive a switch of mode."""
        return dict(self._explicit)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache each token of the conversation takes (with the cache's kv_bits)."""
        dtype_bytes = self.model.model.norm.weight.dtype.size  # the compute dtype
        return kv_bytes_per_token(self.model.args, self.cache.kv_bits, dtype_bytes)

    def tokens_that_fit(self) -> int | None:
        """How many more tokens of KV cache the free memory holds now (None: unknown)."""
        free = available_memory()
        return None if free is None else free // max(self.kv_bytes_per_token, 1)

    @property
    def context_used(self) -> int:
        """Tokens the conversation so far takes in the context."""
        messages = self.messages
        if not messages:
            return 0
        key = json.dumps(messages, ensure_ascii=False)
        if self._used[0] != key:
            ids = self.tokenizer.render(messages, add_generation_prompt=False)
            self._used = (key, len(ids))
        return self._used[1]

    # --- changing the conversation ---------------------------------------------------------------

    def set(self, name: str, value: Any) -> None:
        """Set a sampling value explicitly (it then holds in both modes); SettingsError if invalid.

        name: a setting's name or any alias /set accepts (`temp`); value: a number or its text.
        """
        name = setting_name(name)
        self._explicit[name] = validate_setting(name, value)

    def unset(self, name: str) -> None:
        """Return a sampling value to the mode's preset."""
        self._explicit.pop(setting_name(name), None)

    def send(self, text: str) -> Reply:
        """Send a user message; iterate the Reply for its text, then read `reply.result`.

        Raises ContextOverflowError or TemplateError before anything changes. Close the reply (or
        let KeyboardInterrupt through its iteration) to interrupt: the partial reply is kept in
        the history, marked interrupted.
        """
        self._close_active()
        return self._begin(Turn(str(text)), list(self._turns))

    def send_tool_results(self, results: list[ToolResult]) -> Reply:
        """Answer the last reply's tool calls and let the model go on (a step of the tool loop).

        Results are put in the order of the calls they answer (by tool_call_id when given, else
        by position); ToolError for a result that answers no call of the last reply.
        """
        self._close_active()
        last = self._turns[-1] if self._turns else None
        if last is None or not last.tool_calls:
            raise HistoryError("no tool call to answer: the last reply made none")
        ordered = order_results(results, last.tool_calls)
        return self._begin(Turn(None, tool_results=ordered), list(self._turns))

    def retry(self) -> Reply:
        """Generate the last reply again (the old one is dropped once the new one starts)."""
        self._close_active()
        if not self._turns:
            raise HistoryError("nothing to retry: the conversation has no reply yet")
        last = self._turns[-1]
        return self._begin(Turn(last.user, tool_results=last.tool_results), self._turns[:-1])

    def undo(self) -> None:
        """Drop the last exchange (the user message and its reply)."""
        self._close_active()
        if not self._turns:
            raise HistoryError("nothing to undo: the conversation is empty")
        self._turns.pop()

    def reset(self) -> None:
        """Clear the history; the system prompt and settings stay."""
        self._close_active()
        self._turns = []
        if self.rope_plan is not None and self.rope_plan.factor is not None:
            switch(self.model, self.rope_plan, None)  # a new conversation starts native again
            self.cache.clear()

    def save(self, path: str | Path, *, with_cache: bool = False) -> int | None:
        """Write the conversation to a JSON transcript; with_cache also writes the KV cache beside
        it (conv.kv.safetensors) and returns that file's size in bytes."""
        self._close_active()
        data = TranscriptData(
            self.model_id, self._system, self._thinking, dict(self._explicit), list(self._turns)
        )
        write_transcript(path, data, self.settings.as_dict())
        if not with_cache:
            return None
        from qwen3_mlx.cache_file import save_beside

        return save_beside(Path(path).expanduser(), self.model, self.tokenizer, self.cache)

    def load(self, path: str | Path) -> str | None:
        """Continue the conversation saved in a transcript (history, system, thinking, settings).

        A KV cache saved beside it is restored when it was made by this model with these settings
        (the next reply then prefills only the new message); otherwise the return value says in
        one line why it was not, and the conversation is prefilled on the next reply.
        """
        data = read_transcript(path)
        self._close_active()
        self.thinking = data.thinking
        self._system = data.system
        self._explicit = dict(data.explicit_settings)
        self._turns = list(data.turns)
        from qwen3_mlx.cache_file import CacheFileError, cache_path, restore_beside

        if not cache_path(Path(path).expanduser()).exists():
            return None
        try:
            self.cache = restore_beside(
                Path(path).expanduser(), self.model, self.tokenizer, self.cache, self.rope_plan
            )
        except CacheFileError as error:
            return f"{error}; the conversation will be prefilled instead"
        return f"restored the KV cache ({len(self.cache.tokens):,} tokens)"

    # --- one reply -----------------------------------------------------------------------------------

    def _close_active(self) -> None:
        active, self._active = self._active, None
        if active is not None:
            active.close()  # records an interrupted reply

    def _begin(self, start: Turn, kept: list[Turn]) -> Reply:
        messages = history_messages(self._system, kept)
        if start.user is not None:
            messages.append({"role": "user", "content": start.user})
        messages += [result.message() for result in start.tool_results]
        scaling = getattr(self.model.args, "rope_scaling", None) or {}
        prepared = prepare_prompt(
            self.tokenizer,
            messages,
            defaults=self.generation_config,
            context_limit=self.context_limit,
            thinking=self._thinking,
            tools=self.tools,
            explicit=self._explicit,
            yarn_enabled=self.rope_plan is not None
            or scaling.get("rope_type", scaling.get("type")) == "yarn",
        )
        if prepared.thinks and prepared.sampling.temperature == 0:
            warnings.warn(
                "temperature 0 (greedy decoding) in thinking mode can loop endlessly; "
                "Qwen3 recommends temperature 0.6",
                GreedyThinkingWarning,
                stacklevel=3,
            )
        self._active = self._reply(start, kept, prepared.prompt, prepared.sampling)
        return self._active

    def _reply(
        self, start_turn: Turn, kept: list[Turn], prompt: list[int], sampling: Sampling
    ) -> Reply:
        def on_start() -> None:
            self._turns = kept  # a retry drops the old reply only now that the new one starts
            self._replies += 1

        def on_end(result: TurnResult, started: bool) -> None:
            if self._active is reply:
                self._active = None
            if started:
                self._turns.append(start_turn.answered_by(result))

        reply = start_reply(
            self.model,
            self.tokenizer,
            self.cache,
            prompt,
            sampling,
            stop_ids=self._stop_ids,
            context_limit=self.context_limit,
            tools=self._tool_setup,
            repetition_guard=self.repetition_guard,
            seed_index=self._replies,
            on_prefill=self.on_prefill,
            rope=self.rope_plan,
            on_notice=self.on_notice,
            on_start=on_start,
            on_end=on_end,
            **self._token_source(),
        )
        return reply

    def _token_source(self) -> dict[str, Any]:
        """start_reply's `generate=` when replies decode speculatively (the drafter sees the
        tokens the cache keeps as well as the prompt part it is handed)."""
        if self.speculation is None:
            return {}
        return {"generate": self.speculation.source(lambda: self.cache.tokens)}


def _clean_system(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None
