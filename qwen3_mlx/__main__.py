"""`python -m qwen3_mlx` runs the command line."""

from qwen3_mlx.cli.app import main

if __name__ == "__main__":
    main()
