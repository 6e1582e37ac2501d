"""YaRN only when needed (`--rope-scaling auto`).

Qwen3's model card warns that static YaRN "may impact performance on shorter texts", yet every
local runner applies it from the first token. Here the model runs with native RoPE while the
conversation fits the window it was trained on, and switches to YaRN with the smallest factor that
fits (2, then 4, as the card advises) only when a reply would pass it. Keys already in the KV cache
were rotated with the old frequencies, so a switch drops the cache and prefills the conversation
once more; from then on the logits are those of a run that used that factor from the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen3_mlx.config import yarn_scaling
from qwen3_mlx.model import CausalLM
from qwen3_mlx.rope import RoPE

# A model whose config already allows this much context was trained long (Thinking-2507:
# 262,144) and never needs YaRN.
NATIVELY_LONG = 131_072
# The window Qwen3's hybrid models were trained on (their configs say 40,960 = 32,768 + room).
QWEN3_ORIGINAL = 32_768
FACTORS = (2.0, 4.0)


@dataclass
class RopeAuto:
    """Which RoPE a model runs with now, and when it has to change."""

    original: int  # tokens native RoPE serves
    factors: tuple[float, ...]  # the YaRN factors to try, smallest first
    factor: float | None = None  # the factor in use; None: native RoPE
    switches: int = 0  # how many times the conversation was prefilled again

    @classmethod
    def for_model(cls, args: Any) -> RopeAuto | None:
        """The plan for a model's config; None when it never needs YaRN."""
        configured = args.rope_scaling
        if configured is not None:  # a config that carries YaRN: its window and largest factor
            original = int(configured["original_max_position_embeddings"])
            largest = float(configured["factor"])
            if largest <= 1.0:
                return None
        elif args.max_position_embeddings >= NATIVELY_LONG:
            return None
        else:
            original = min(args.max_position_embeddings, QWEN3_ORIGINAL)
            largest = FACTORS[-1]
        factors = tuple(f for f in FACTORS if f < largest) + (largest,)
        return cls(original, factors)

    def window(self, factor: float | None) -> int:
        """Tokens of context with a factor (None: native)."""
        return self.original if factor is None else int(self.original * factor)

    @property
    def limit(self) -> int:
        """The most context this plan can reach."""
        return self.window(self.factors[-1])

    @property
    def current_window(self) -> int:
        """Tokens of context with the RoPE in use now."""
        return self.window(self.factor)

    def factor_for(self, length: int) -> float | None:
        """The smallest factor, never below the one in use, whose window holds `length` tokens."""
        if length <= self.current_window:
            return self.factor
        for factor in self.factors:
            if length <= self.window(factor):
                return factor
        return self.factors[-1]

    def describe(self, factor: float) -> str:
        """One line a view shows when a conversation outgrows the RoPE and it widens to `factor`.

        (Going back to native RoPE, for a new conversation, happens silently.)
        """
        return (
            f"the conversation passed {self.current_window:,} tokens: switching to YaRN factor "
            f"{factor:g} ({self.window(factor):,} tokens) and prefilling it once more"
        )


def use_rope(model: CausalLM, scaling: dict[str, Any] | None) -> None:
    """Give every attention layer RoPE with `scaling` (None: native) and record it in model.args.

    The model's weights are untouched; only the rotary frequencies (and YaRN's attention factor)
    change, so a cache filled before the change no longer matches the model.
    """
    model.args = model.args.with_rope_scaling(scaling)
    for layer in model.layers:
        attention = layer.self_attn
        attention.rope = RoPE(attention.head_dim, model.args.rope_theta, model.args.rope_scaling)


def switch(model: CausalLM, plan: RopeAuto, factor: float | None) -> None:
    """Move the model to `factor` (None: native) under `plan`."""
    scaling = None if factor is None else yarn_scaling(factor, plan.original)
    use_rope(model, scaling)
    plan.factor = factor
