"""Run one reply through a started GenerationWorker, stop it, and let the interpreter end.

`python worker_exit.py`: the exit status is the test (test_server_batching runs it three times).
The decoding thread runs MLX's compiled functions (nn.silu), whose thread-local cache, left to
the thread's own end, could be freed while the interpreter finalizes: an abort, exit 134.
"""

from __future__ import annotations

import queue
from pathlib import Path

from qwen3_mlx.loading import load
from qwen3_mlx.server.prefix_cache import PrefixCache
from qwen3_mlx.server.worker import Finished, GenerationWorker, Job
from qwen3_mlx.settings import Sampling
from qwen3_mlx.tokenizer import IM_END_ID

model, tokenizer, _ = load(Path(__file__).resolve().parent.parent / "models" / "qwen3-tiny-chat")
worker = GenerationWorker(
    model,
    tokenizer,
    PrefixCache(model, 1 << 20),
    stop_ids=frozenset({IM_END_ID}),
    context_limit=1024,
    max_batch=1,
    max_queue=1,
)
worker.start()
items: queue.SimpleQueue = queue.SimpleQueue()
worker.submit(Job(tokenizer.encode("moon river"), Sampling(max_tokens=4), items.put))
while not isinstance(items.get(timeout=60), Finished):
    pass
worker.stop()
