"""`qwen3-mlx serve`: an OpenAI-compatible HTTP server over the same engine as the REPL."""
