"""The tokenizer and chat-template rendering (transformers), plus mlx-lm's streaming detokenizer.

Rendering goes through transformers' own apply_chat_template so our prompt tokens equal theirs
exactly; no template is re-implemented here.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import CheckpointError, TemplateError

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
IM_START_ID = 151644
IM_END_ID = 151645
END_OF_TEXT_ID = 151643

# Bounds on the template, its files and its rendering. Real chat templates are a few KB and render
# in milliseconds into little more than the messages; a template past these is refused as broken.
MAX_TEMPLATE_CHARS = 1 << 20
MAX_FILE_BYTES = {"chat_template.jinja": 1 << 20, "tokenizer_config.json": 16 << 20}
RENDER_SECONDS = 10.0
RENDER_SLACK_CHARS = 1 << 20  # output allowed beyond twice the messages' and tools' own text


class _RenderLimit(BaseException):
    """Raised inside rendering; a BaseException, so jinja's and transformers' handlers let it by."""


@contextmanager
def bounded_rendering(max_chars: int, seconds: float) -> Iterator[None]:
    """Stop the template code run inside with _RenderLimit past `seconds` or `max_chars` of output.

    A profile hook on this thread sees every Python call and return of the compiled template:
    it checks the clock, adds up what the template yields, and refuses any single string past the
    bound (a string doubled in a loop). A hook is about 4x slower than none: milliseconds.
    """
    deadline = time.monotonic() + seconds
    produced = 0

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal produced
        if event == "return" and isinstance(arg, str):
            if frame.f_code.co_filename == "<template>":
                produced += len(arg)
            if produced > max_chars or len(arg) > max_chars:
                raise _RenderLimit(f"its output passed {max_chars:,} characters")
        if time.monotonic() > deadline:
            raise _RenderLimit(f"it ran past {seconds:g} s")

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(previous)


class Tokenizer:
    """Encode, decode and render chat prompts for one model folder."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        self.chat_template: str = hf_tokenizer.chat_template or ""
        self._detokenizer: Any = None
        if not self.chat_template:
            raise TemplateError(
                "the model folder has no chat template (tokenizer_config.json or chat_template.jinja)"
            )
        if len(self.chat_template) > MAX_TEMPLATE_CHARS:
            raise TemplateError(
                f"the model's chat template is {len(self.chat_template):,} characters, "
                f"more than a template can sensibly be ({MAX_TEMPLATE_CHARS:,})"
            )

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special-token additions."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the template honours enable_thinking (Qwen3 hybrid models do; 2507 does not)."""
        return "enable_thinking" in self.chat_template

    @property
    def opens_think_in_prompt(self) -> bool:
        """Whether the generation prompt already opens <think> (Thinking-2507), so output shows only </think>."""
        return self.render_text([{"role": "user", "content": "x"}]).endswith("<think>\n")

    def render_text(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> str:
        """The prompt text the model's own template makes for these messages."""
        kwargs: dict[str, Any] = {}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        max_chars = 2 * (len(str(messages)) + len(str(tools or ""))) + RENDER_SLACK_CHARS
        try:
            with bounded_rendering(max_chars, RENDER_SECONDS):
                return self.hf.apply_chat_template(
                    messages,
                    tools=tools,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    **kwargs,
                )
        except _RenderLimit as limit:
            raise TemplateError(f"the model's chat template is broken: {limit}") from None
        except Exception as error:  # jinja2 raises many types; the user needs one line
            raise TemplateError(f"chat template failed: {error}") from None

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Prompt token ids, equal to transformers' apply_chat_template(tokenize=True)."""
        text = self.render_text(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        return self.encode(text)

    def new_detokenizer(self) -> Any:
        """A fresh streaming detokenizer that holds bytes back until they form valid UTF-8."""
        if self._detokenizer is None:
            from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

            # Note: it drops a leading space of the first text, which decode() keeps; the stream
            # layer (qwen3_mlx.stream) relies on that trim at the start of each section.
            self._detokenizer = BPEStreamingDetokenizer(self.hf)
        # Building one maps all 151,669 ids to strings (~0.3 s); copies share that read-only map,
        # and reset() gives each its own streaming state.
        detokenizer = copy.copy(self._detokenizer)
        detokenizer.reset()
        return detokenizer


def read_hf_tokenizer(model_dir: Path) -> Any:
    """The transformers tokenizer of a model folder (never executing code from it)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json (incomplete model folder?)")
    for name, limit in MAX_FILE_BYTES.items():
        path = model_dir / name
        if path.is_file() and path.stat().st_size > limit:
            # transformers would read it whole, template included, before we could look.
            raise TemplateError(f"{path}: {path.stat().st_size:,} bytes, more than {limit:,}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:  # transformers raises many types for bad folders
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({error})") from None
    # The context decides what is too long (ContextOverflowError says so in one line); without
    # this, transformers warns about its own model_max_length first, on every long prompt.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """Load the tokenizer files of a model folder (never executing code from it)."""
    return Tokenizer(read_hf_tokenizer(model_dir))


def read_hf_tokenizer_in_background(model_dir: Path) -> Future:
    """Start read_hf_tokenizer on a daemon thread; the Future gives the tokenizer or its error.

    Importing transformers (and torch, when installed) takes seconds of Python work, while reading
    the weights is native code that releases the GIL, so the two overlap almost fully. A daemon
    thread, unlike an executor's, never holds up an exit (Ctrl-C while loading). load_model imports
    nothing while it runs (tested), so the two threads never race on the import locks.
    """
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(read_hf_tokenizer(model_dir))
        except BaseException as error:  # handed to the caller through the Future
            future.set_exception(error)

    threading.Thread(target=run, name="qwen3-mlx-tokenizer", daemon=True).start()
    return future
