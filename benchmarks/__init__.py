"""Benchmarks against mlx-lm: `python -m benchmarks.run` (see docs/benchmarks.md). Never imported by qwen3_mlx."""
