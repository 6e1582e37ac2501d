"""`qwen3-mlx serve`: the OpenAI-compatible server (chat, completions, models, metrics)."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from qwen3_mlx import sizes
from qwen3_mlx.cli import options as o
from qwen3_mlx.cli.distributed_run import distributed_command, end_for_lost_rank
from qwen3_mlx.cli.guard import reported_errors
from qwen3_mlx.settings import SETTINGS

SERVER = "Server"
# The shared options that make sense for a server: the model, sampling defaults, context,
# --kv-bits (the prefix cache keeps idle entries quantized) and the drafter.
SERVE_SHARED = (
    "model",
    *SETTINGS,
    "rope_scaling",
    "rope_factor",
    "compute_dtype",
    "kv_bits",
    "draft_model",
    "draft",
    "draft_tokens",
)


class ReasoningField(str, Enum):
    """Where replies put the reasoning."""

    reasoning_content = "reasoning_content"
    reasoning = "reasoning"
    both = "both"
    content = "content"


def parse_size(text: str) -> int:
    """Bytes from a size option ('4GiB', '512MB', '4g'); BadParameter otherwise."""
    try:
        return sizes.parse_size(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _check_size(value: str) -> str:
    parse_size(value)
    return value


def _check_key(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter(
            "an empty key would turn authentication off; leave --api-key out (and unset "
            "QWEN3_MLX_API_KEY) for a server without one"
        )
    return value


@o.with_session_options(only=SERVE_SHARED)
@distributed_command
def serve_command(
    ctx: typer.Context,
    session: o.SessionOptions,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to bind (loopback unless told).", rich_help_panel=SERVER
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, rich_help_panel=SERVER)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="QWEN3_MLX_API_KEY",
            callback=_check_key,
            help="Require `Authorization: Bearer KEY`.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    max_concurrency: Annotated[
        int,
        typer.Option(
            "--max-concurrency",
            min=1,
            help="Requests decoded together in one batch; more wait in the queue.",
            rich_help_panel=SERVER,
        ),
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            min=0,
            help="Requests waiting for the batch; more get HTTP 503.",
            rich_help_panel=SERVER,
        ),
    ] = 32,
    prompt_cache_size: Annotated[
        str,
        typer.Option(
            "--prompt-cache-size",
            callback=_check_size,
            metavar="BYTES",
            help="Bound of the multi-entry prefix cache, like 4GiB.",
            rich_help_panel=SERVER,
        ),
    ] = "4GiB",
    reasoning_field: Annotated[
        ReasoningField,
        typer.Option(
            "--reasoning-field",
            help="Field for the reasoning in replies; content: leave <think>…</think> in the "
            "content (llama.cpp's --reasoning-format none).",
            rich_help_panel=SERVER,
        ),
    ] = ReasoningField.reasoning_content,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            help="The model id clients see [default: a local folder's name, a hub id as typed].",
            rich_help_panel=SERVER,
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="A browser origin allowed to call the server (CORS, preflight answered); "
            "repeat for more, * for any [default: none, CORS off].",
            rich_help_panel=SERVER,
        ),
    ] = None,
    context_length: Annotated[
        int | None,
        typer.Option(
            "--context-length",
            min=16,
            help="Tokens of context per request [default: the model's].",
            rich_help_panel=SERVER,
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            metavar="NAME",
            help="A Host name to answer besides loopback's (repeatable; '*' for any). Bound to "
            "loopback, the server answers only loopback names, against DNS rebinding.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    shared_prompt_cache: Annotated[
        bool,
        typer.Option(
            "--shared-prompt-cache/--no-shared-prompt-cache",
            help="Let a request reuse the cached prefix of any earlier one (its cached_tokens "
            "then tell how much of its prompt another client sent); off: nothing is reused.",
            rich_help_panel=SERVER,
        ),
    ] = True,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            min=0.1,
            metavar="SECONDS",
            help="A request's head and body must arrive within this; slower ones are closed.",
            rich_help_panel=SERVER,
        ),
    ] = 60.0,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            min=0,
            metavar="SECONDS",
            help="After Ctrl-C or SIGTERM, replies in flight may run this long; then they end "
            "with an error event.",
            rich_help_panel=SERVER,
        ),
    ] = 30.0,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (Qwen-Agent and the openai SDK work unchanged).

    Under mlx.launch, rank 0 serves HTTP and the other ranks run their shard of every batch.
    Ctrl-C or SIGTERM stops the server (exit status 0).
    """
    with reported_errors(ctx):
        spec = session.spec(ctx)
        if spec.auto_rope:
            # One model serves every conversation in the prefix cache: moving its RoPE for one
            # would invalidate all the others' caches mid-flight.
            raise typer.BadParameter(
                "auto is for chat and prompt (a server shares one model between many "
                "conversations); use --rope-scaling yarn",
                param_hint="--rope-scaling",
            )
        from qwen3_mlx.cli.loading_status import loading
        from qwen3_mlx.parallel.distributed import current_group, load_for_group
        from qwen3_mlx.server.guard import is_loopback
        from qwen3_mlx.server.runner import (
            ServeOptions,
            build_state,
            listening_socket,
            serve,
            served_model_id,
        )

        if not is_loopback(host) and not api_key:
            print(
                f"Warning: serving on {host} without --api-key: anyone who can reach this "
                "address can use the model",
                file=sys.stderr,
                flush=True,
            )
        sock = listening_socket(host, port)  # a taken port is one line now, not after loading
        with loading(spec.model):
            model, tokenizer, generation_config = load_for_group(
                spec.model,
                current_group(),
                rope_scaling=spec.rope_scaling,
                compute_dtype=spec.compute_dtype,
            )
            speculation = None
            if spec.draft is not None:  # loaded with the model's policy, under the same status
                speculation = spec.draft.build(
                    model,
                    tokenizer,
                    compute_dtype=spec.compute_dtype,
                    rope_scaling=spec.rope_scaling,
                    kv_bits=spec.kv_bits,
                )
                o.debug_draft_note(speculation, spec.debug)
        options = ServeOptions(
            host=host,
            port=port,
            api_key=api_key,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            prompt_cache_bytes=parse_size(prompt_cache_size),
            reasoning_field=reasoning_field.value,
            context_length=context_length,
            sampling=spec.sampling,
            allow_hosts=tuple(allow_host or ()),
            shared_prompt_cache=shared_prompt_cache,
            request_seconds=request_timeout,
            drain_seconds=shutdown_timeout,
            on_lost_rank=end_for_lost_rank,
            cors_origins=tuple(cors_origin or ()),
            kv_bits=spec.kv_bits,
        )
        model_id = served_model_id(spec.model, served_model_name)
        state = build_state(
            model, tokenizer, generation_config, model_id, options, speculation=speculation
        )
        serve(state, sock, request_seconds=request_timeout)
