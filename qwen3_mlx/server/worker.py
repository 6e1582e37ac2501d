"""The generation worker: one thread runs one Reply at a time from a bounded queue.

This is not continuous batching: requests are decoded one after another, each in the prefix-cache
entry that shares most of its prompt. The queue bound (running + waiting) turns overload into a
503 instead of an ever longer wait. Events go back to the request's own delivery callback (the
HTTP side hands them to its event loop); a request that is cancelled (client gone, stop string
seen) closes its Reply at the next event.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen3_mlx.engine import ToolSetup, start_reply
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.events import ReplyEvent, TurnResult
from qwen3_mlx.server.hooks import AnswerGrammar, StepHook, prefill_calls
from qwen3_mlx.server.prefix_cache import PrefixCache
from qwen3_mlx.stream import RepetitionGuard
from qwen3_mlx.thinking import Part, ThinkParser, prompt_phase


class ServerBusy(Qwen3Error):
    """The queue is full: the request is refused (HTTP 503), not kept waiting."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated answer token with its log probability and the top alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Piece:
    """One event of the reply, with the logprobs of the answer tokens generated since the last."""

    event: ReplyEvent
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Finished:
    """The reply ended: its result, how many prompt tokens the cache held, trailing logprobs."""

    result: TurnResult
    cached_tokens: int
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Failed:
    """The reply could not run."""

    error: BaseException


@dataclass
class Job:
    """One request's reply, as the worker needs it."""

    prompt: list[int]
    settings: dict[str, Any]
    deliver: Callable[[Piece | Finished | Failed], None]
    tools: ToolSetup = field(default_factory=ToolSetup)
    top_logprobs: int | None = None  # None: no logprobs
    schema: dict[str, Any] | None = None
    json_answer: bool = False  # response_format json_object or json_schema
    frequency_penalty: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


class GenerationWorker:
    """A daemon thread that runs queued jobs one by one against one model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cache: PrefixCache,
        *,
        stop_ids: frozenset[int],
        context_limit: int,
        max_pending: int,
        metrics: Any = None,
        repetition_guard: RepetitionGuard | None = RepetitionGuard(),  # noqa: B008 (frozen)
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.stop_ids = stop_ids
        self.context_limit = context_limit
        self.max_pending = max_pending
        self.metrics = metrics
        self.guard = repetition_guard
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0  # queued + running
        self.running = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="qwen3-mlx-generation", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to end after the job it is running."""
        self.jobs.put(None)

    def submit(self, job: Job) -> None:
        """Queue a job; ServerBusy when max_pending jobs are already queued or running."""
        with self.lock:
            if self.pending >= self.max_pending:
                raise ServerBusy(
                    f"the server is busy: {self.pending} requests are running or queued "
                    f"(--max-concurrency {self.max_pending}); retry later"
                )
            self.pending += 1
        self._gauge()
        self.jobs.put(job)

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker."""
        return self.pending - self.running

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued)
            self.metrics.running.set(self.running)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.running = 1
            self._gauge()
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            except BaseException as error:  # handed to the request, never kills the thread
                job.deliver(Failed(error))
            finally:
                with self.lock:
                    self.running = 0
                    self.pending -= 1
                self._gauge()

    def _run(self, job: Job) -> None:
        choice = self.cache.choose(job.prompt)
        phase = prompt_phase(job.prompt)
        grammar = None
        if job.json_answer:
            grammar = AnswerGrammar(self.tokenizer, job.schema, self.model.args.vocab_size)
        hook = StepHook(
            self.model,
            prefill_calls(len(job.prompt) - choice.cached_tokens),
            phase,
            top_logprobs=job.top_logprobs,
            grammar=grammar,
            frequency_penalty=job.frequency_penalty,
        )
        reply = start_reply(
            hook,
            self.tokenizer,
            choice.cache,
            job.prompt,
            job.settings,
            stop_ids=self.stop_ids,
            context_limit=self.context_limit,
            tools=job.tools,
            repetition_guard=self.guard,
        )
        labels = LogprobLabels(reply, hook, phase, job, self.stop_ids)
        first = True
        try:
            for event in reply:
                if first and self.metrics is not None:
                    self.metrics.ttft.observe(time.perf_counter() - job.enqueued)
                first = False
                job.deliver(Piece(event, labels.new()))
                if job.cancelled.is_set():
                    reply.close()
                    break
        finally:
            reply.close()
            self.cache.evict(keep=choice.cache)
        for event in reply:  # what the detokenizer held back when it was closed
            job.deliver(Piece(event, []))
        assert reply.result is not None
        if self.metrics is not None:
            self.metrics.record_reply(reply.result, choice.cached_tokens)
        job.deliver(Finished(reply.result, choice.cached_tokens, labels.new()))


class LogprobLabels:
    """The logprobs of the answer tokens of a reply, handed out as they are generated."""

    def __init__(self, reply: Any, hook: StepHook, phase: Any, job: Job, stop_ids: frozenset):
        self.tokens = reply.tokens  # a live view of the ids generated so far
        self.hook = hook
        self.parser = ThinkParser(phase, tools=job.tools.parses_calls)
        self.wanted = job.top_logprobs is not None
        self.stop_ids = stop_ids
        self.done = 0

    def new(self) -> list[TokenLogprob]:
        """Entries for the answer tokens generated since the last call."""
        if not self.wanted:
            return []
        entries = []
        while self.done < len(self.tokens) and self.done < len(self.hook.rows):
            token = self.tokens[self.done]
            part = self.parser.feed(token)
            if part is Part.ANSWER and token not in self.stop_ids:
                logprob, top = self.hook.entry(self.done, token)
                entries.append(TokenLogprob(token, logprob, top))
            self.done += 1
        return entries
