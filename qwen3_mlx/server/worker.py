"""The generation worker: continuous batching of the server's replies.

One decoding thread owns the model and a BatchDecoder: it takes queued jobs while the batch has
room (--max-concurrency rows), picks each one's prefix-cache entry, and runs one batched decode
step after another; replies join and leave between steps. Each running job also has a thread of
its own that drives its Reply (detokenizing, think and tool-call split, stop rules) and hands the
events to the request's delivery callback. Jobs beyond the batch wait in a queue with a bound
(--max-queue); beyond it a request is refused (HTTP 503) instead of waiting ever longer.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from qwen3_mlx.batching import BatchDecoder, BatchRow
from qwen3_mlx.engine import ToolSetup, start_reply
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.events import ReplyEvent, TurnResult
from qwen3_mlx.generate import GeneratedToken, LogitsProcessor, Sampler
from qwen3_mlx.parallel.lockstep import lost_connection
from qwen3_mlx.parallel.watchdog import is_lost_connection
from qwen3_mlx.reply import Reply
from qwen3_mlx.server.metrics import Metrics
from qwen3_mlx.server.prefix_cache import CacheChoice, PrefixCache
from qwen3_mlx.server.processors import AnswerConstraint, AnswerGrammar, LogprobRecorder
from qwen3_mlx.settings import Sampling
from qwen3_mlx.speculative import Speculation, SpeculativeRow
from qwen3_mlx.stream import RepetitionGuard
from qwen3_mlx.thinking import Part, prompt_phase
from qwen3_mlx.tokenizer import Tokenizer

IDLE_WAIT_SECONDS = 0.1


class ServerBusy(Qwen3Error):
    """The queue is full: the request is refused (HTTP 503), not kept waiting."""


class ServerStopped(Qwen3Error):
    """The server shut down before the reply ended."""


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
    sampling: Sampling
    deliver: Callable[[Piece | Finished | Failed], None]
    tools: ToolSetup = field(default_factory=ToolSetup)
    top_logprobs: int | None = None  # None: no logprobs
    schema: dict[str, Any] | None = None
    json_answer: bool = False  # response_format json_object or json_schema
    speculative: bool = True  # False: a plain row even when it runs alone
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


class GenerationWorker:
    """The decoding thread, the bounded queue in front of it and the running jobs' threads."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        cache: PrefixCache,
        *,
        stop_ids: frozenset[int],
        context_limit: int,
        max_batch: int,
        max_queue: int,
        metrics: Metrics | None = None,
        repetition_guard: RepetitionGuard | None = RepetitionGuard(),  # noqa: B008 (frozen)
        speculation: Speculation | None = None,
    ):
        self.model = model
        # A reply that runs alone decodes speculatively (speculative.SpeculativeRow).
        self.speculation = speculation
        self.tokenizer = tokenizer
        self.cache = cache
        self.stop_ids = stop_ids
        self.context_limit = context_limit
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.guard = repetition_guard
        self.decoder = BatchDecoder(model, stop_ids)
        self.waiting: collections.deque[Job] = collections.deque()
        self.new_rows: queue.SimpleQueue[BatchRow] = queue.SimpleQueue()
        self.running = 0  # jobs started and not finished
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.watchdog: Any = None  # under a group: bounds each step's wait for the other ranks
        self.thread = threading.Thread(target=self._loop, name="qwen3-mlx-decoder", daemon=True)

    def start(self) -> None:
        """Start the decoding thread."""
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the decoding thread (replies still running fail with ServerStopped) and wait for
        it, so no MLX work is left running when the process exits."""
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; ServerBusy when the batch is full and max_queue jobs already wait."""
        with self.lock:
            if self.running + len(self.waiting) >= self.max_batch + self.max_queue:
                raise ServerBusy(
                    f"the server is busy: {self.running} replies running and "
                    f"{len(self.waiting)} queued (--max-concurrency {self.max_batch}, "
                    f"--max-queue {self.max_queue}); retry later"
                )
            self.waiting.append(job)
        self._gauge()
        self.wake.set()

    @property
    def queued(self) -> int:
        """Jobs waiting for a place in the batch."""
        return len(self.waiting)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued)
            self.metrics.running.set(self.running)

    def abandon(self, error: BaseException) -> None:
        """Fail every reply at once, from any thread: the decoding thread is stuck for good (a
        rank of the group has gone) and the process is about to end."""
        self.stopping = True
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for job in waiting:
            job.deliver(Failed(error))
        while not self.new_rows.empty():
            self.new_rows.get().end(error)
        self.decoder.fail_all(error)

    def _loop(self) -> None:
        while not self.stopping:
            with self._watched():
                self._start_jobs()
                while not self.new_rows.empty():
                    self.decoder.add(self.new_rows.get())
                if not self.decoder.idle:
                    try:
                        self.decoder.run_once()
                    except BaseException as error:  # every row's reply fails; the thread goes on
                        self.decoder.fail_all(error)
                        if self.watchdog is not None and is_lost_connection(error):
                            self.watchdog.fire(lost_connection(error))
                    continue
            self.wake.wait(IDLE_WAIT_SECONDS)
            self.wake.clear()
        self.decoder.fail_all(ServerStopped("the server is shutting down"))
        while not self.new_rows.empty():
            self.new_rows.get().end(ServerStopped("the server is shutting down"))
        # This thread's MLX streams and compile cache go now, while Python runs: left to the
        # thread's end they are freed after the interpreter may have begun to finalize, which
        # can abort the process ("terminate called without an active exception", exit 134).
        mx.clear_streams()

    def _watched(self) -> Any:
        """The watchdog's watch over one step (nothing without a group)."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.watching("a decoding step")

    def _start_jobs(self) -> None:
        while True:
            with self.lock:
                if self.running >= self.max_batch or not self.waiting:
                    return
                job = self.waiting.popleft()
                if job.cancelled.is_set():
                    continue
                self.running += 1
            self._gauge()
            try:
                choice = self.cache.choose(job.prompt)  # here: the decoder owns the arrays
            except Exception as error:  # handed to the request; the decoder goes on
                job.deliver(Failed(error))
                with self.lock:
                    self.running -= 1
                continue
            threading.Thread(
                target=self._serve, args=(job, choice), name="qwen3-mlx-reply", daemon=True
            ).start()

    def _serve(self, job: Job, choice: CacheChoice) -> None:
        try:
            self._run(job, choice)
        except BaseException as error:  # handed to the request, never kills the worker
            job.deliver(Failed(error))
        finally:
            self.cache.release(choice.cache)
            with self.lock:
                self.running -= 1
            self._gauge()
            self.wake.set()

    def _run(self, job: Job, choice: CacheChoice) -> None:
        phase = prompt_phase(job.prompt)
        extra: list[Any] = []
        if job.json_answer:
            grammar = AnswerGrammar(self.tokenizer, job.schema, self.model.args.vocab_size)
            extra.append(AnswerConstraint(grammar, phase))
        recorder = LogprobRecorder(job.top_logprobs) if job.top_logprobs is not None else None
        if recorder is not None:
            extra.append(recorder)  # last: it records what the sampler sees
        reply = start_reply(
            self.model,
            self.tokenizer,
            choice.cache,
            job.prompt,
            job.sampling,
            stop_ids=self.stop_ids,
            context_limit=self.context_limit,
            tools=job.tools,
            repetition_guard=self.guard,
            extra_processors=extra,
            generate=functools.partial(
                self._row_source, held=lambda: choice.cache.tokens, speculative=job.speculative
            ),
        )
        labels = LogprobLabels(reply, recorder, self.stop_ids)
        first = True
        try:
            for event in reply:
                if first and self.metrics is not None:
                    self.metrics.ttft.observe(time.perf_counter() - job.enqueued)
                first = False
                job.deliver(Piece(event, labels.new()))
                if job.cancelled.is_set():
                    break
        finally:
            reply.close()
        for event in reply:  # what the detokenizer held back when it was closed
            job.deliver(Piece(event, []))
        assert reply.result is not None
        if self.metrics is not None:
            self.metrics.record_reply(reply.result, choice.cached_tokens)
        job.deliver(Finished(reply.result, choice.cached_tokens, labels.new()))

    def _row_source(
        self,
        model: Any,
        prompt: list[int],
        cache: list[Any],
        *,
        sampler: Sampler,
        logits_processors: Sequence[LogitsProcessor] = (),
        max_tokens: int,
        on_prefill: Callable[[int, int], None] | None = None,
        seed: int | None = None,
        held: Callable[[], list[int]] = list,
        speculative: bool = True,
    ) -> Iterator[GeneratedToken]:
        """start_reply's token generator for the worker's jobs: the reply becomes a row of the
        batch, with its own random key (from the reply's seed, or a random one). With a drafter
        it is a SpeculativeRow unless the request turned speculation off (held(): the tokens its
        cache kept before `prompt`)."""
        options = dict(
            sampler=sampler,
            processors=logits_processors,
            max_tokens=max_tokens,
            seed=seed,
            on_prefill=on_prefill,
        )
        if self.speculation is None or not speculative:
            row = BatchRow(prompt, cache, **options)
        else:
            row = SpeculativeRow(
                prompt, cache, speculation=self.speculation, context=held(), **options
            )
        if self.stopping:
            row.end(ServerStopped("the server is shutting down"))
            return row
        self.new_rows.put(row)
        self.wake.set()
        return row


class LogprobLabels:
    """The logprobs of the answer tokens of a reply, handed out as they are generated."""

    def __init__(self, reply: Reply, recorder: LogprobRecorder | None, stop_ids: frozenset[int]):
        self.tokens = reply.tokens  # live views of the ids generated so far ...
        self.parts = reply.parts  # ... and of the part of the reply each fell in
        self.recorder = recorder
        self.stop_ids = stop_ids
        self.done = 0

    def new(self) -> list[TokenLogprob]:
        """Entries for the answer tokens generated since the last call."""
        if self.recorder is None:
            return []
        entries = []
        while self.done < len(self.tokens) and self.done < len(self.recorder.steps):
            token = self.tokens[self.done]
            part = self.parts[self.done] if self.done < len(self.parts) else None
            logprob, top = self.recorder.take(self.done, token)
            if part is Part.ANSWER and token not in self.stop_ids:
                entries.append(TokenLogprob(token, logprob, top))
            self.done += 1
        return entries
