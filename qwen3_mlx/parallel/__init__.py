"""The tensor-parallel wing: mx.distributed groups, lockstep rank-0 models and per-rank loading.

Loaded only when a command runs under `mlx.launch` with more than one rank; the core reaches it
through `loading.load_group_model`'s lazy import.
"""
