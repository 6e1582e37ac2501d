"""The `qwen3-mlx` command line: Typer commands, the chat REPL and its rendering.

Every module here imports MLX, transformers and the model code lazily (inside functions), so
`qwen3-mlx --help` stays fast.
"""
