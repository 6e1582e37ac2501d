"""Where the CLI keeps its files (XDG folders) and which model it uses by default.

Model precedence: --model flag > QWEN3_MLX_MODEL > `model` in the config file > DEFAULT_MODEL.
MCP: --mcp-config > `mcp_config` in the config file; `mcp_allow` lists the `server.tool` names
(shell wildcards) that run without asking.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import ConfigError

DEFAULT_MODEL = "Qwen/Qwen3-4B-MLX-4bit"
MODEL_ENV = "QWEN3_MLX_MODEL"
APP_DIR = "qwen3-mlx"
CONFIG_KEYS = {
    "model": str,
    "mcp_config": str,
    "mcp_allow": list,
    "draft_model": str,
    "draft": str,
    "draft_tokens": int,
}


def config_home() -> Path:
    """$XDG_CONFIG_HOME, or ~/.config when it is unset or empty."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def data_home() -> Path:
    """$XDG_DATA_HOME, or ~/.local/share when it is unset or empty."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def state_home() -> Path:
    """$XDG_STATE_HOME, or ~/.local/state when it is unset or empty."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")


def mcp_log_dir() -> Path:
    """Where MCP servers' stderr goes: $XDG_STATE_HOME/qwen3-mlx/ (one file per server)."""
    return state_home() / APP_DIR


def config_path() -> Path:
    """The config file: $XDG_CONFIG_HOME/qwen3-mlx/config.toml."""
    return config_home() / APP_DIR / "config.toml"


def history_path() -> Path:
    """The chat REPL's line history: $XDG_DATA_HOME/qwen3-mlx/history."""
    return data_home() / APP_DIR / "history"


def read_config_file(path: Path | None = None) -> dict[str, Any]:
    """The config file's settings; an empty dict when there is no file."""
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10; tomli is the same parser, published separately
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    for key, value in data.items():
        expected = CONFIG_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: {key} must be a {expected.__name__}")
        if expected is list and not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: {key} must be a list of strings")
    return data


def resolve_model(flag_or_env: str | None) -> str:
    """The model to use: the flag (or env var, which Typer folds into it), the config file, the default."""
    if flag_or_env:
        return flag_or_env
    return read_config_file().get("model") or DEFAULT_MODEL


def mcp_settings(flag: Path | None) -> tuple[Path | None, list[str]]:
    """The MCP config file (the flag, else `mcp_config`, relative to config.toml) and allow-list."""
    data = read_config_file()
    allow = list(data.get("mcp_allow", []))
    if flag is not None:
        return Path(flag).expanduser(), allow
    configured = data.get("mcp_config")
    if not configured:
        return None, allow
    path = Path(configured).expanduser()
    return (path if path.is_absolute() else config_path().parent / path), allow
