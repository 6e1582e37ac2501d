"""The files that travel with the weights: tokenizer, chat template, generation config, license.

Only regular files that lie inside the source folder are copied, since an output is often meant for
upload: a `LICENSE` that is a link to ~/.ssh/id_rsa must not end up in it. A link whose target
stays inside the folder is copied as a regular file (the Hugging Face cache is made of links from
`snapshots/REV/` into the repo's `blobs/`, so there "inside" means the repo's cache folder).

A tokenizer file that is there but unusable (a dangling link, a link leading outside, not a regular
file) is an error before any conversion work: copying around it would give a "successful" output
that no loader can tokenize for. Any other such file is skipped with a SkippedSideFileWarning.
A source with no tokenizer files at all converts to an output without them, as the source is.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from qwen3_mlx.quantize.errors import ConversionError

# Tokenizer, chat template, generation config and license travel with the weights; code never does.
SIDE_FILE_PATTERNS = ("*.json", "*.jinja", "merges.txt", "vocab.txt", "LICENSE*", "NOTICE*")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "README.md"}
# Without these, or with a broken one, the output cannot turn text into token ids.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
    }
)


class SkippedSideFileWarning(UserWarning):
    """A side file (license, notice, extra config) was not copied: a link outside, or to nothing."""


def select_side_files(source_dir: Path) -> dict[str, Path]:
    """Output name -> the regular file to copy; refuse a broken tokenizer file, warn on the rest."""
    root = _allowed_root(source_dir)
    chosen: dict[str, Path] = {}
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(source_dir.glob(pattern)):
            name = path.name
            if name in NOT_COPIED or name in chosen or name.startswith("."):
                continue
            if name.endswith(".index.json"):
                continue
            problem = _problem(path, root)
            if problem is None:
                chosen[name] = Path(os.path.realpath(path))
            elif name in TOKENIZER_FILES:
                raise ConversionError(
                    f"{path}: {problem}; the output would have no usable tokenizer "
                    "(put the real file in the model folder)"
                )
            else:
                warnings.warn(
                    f"{path}: {problem}; not copied", SkippedSideFileWarning, stacklevel=2
                )
    return chosen


def _allowed_root(source_dir: Path) -> Path:
    """The folder side files must lie in: the source, or its repo folder in the Hugging Face cache."""
    real = Path(os.path.realpath(source_dir))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def _problem(path: Path, root: Path) -> str | None:
    """Why path must not be copied, or None when it is a regular file inside root."""
    if not path.is_symlink():
        return None if path.is_file() else "is not a regular file"
    target = Path(os.path.realpath(path))  # realpath, unlike resolve(), never raises on a loop
    if not target.exists():
        return f"is a link to {target}, which does not exist"
    if not target.is_relative_to(root):
        return f"is a link to {target}, outside the model folder"
    if not target.is_file():
        return f"is a link to {target}, which is not a regular file"
    return None


def copy_side_files(side_files: dict[str, Path], folder: Path) -> list[str]:
    """Copy the selected side files into folder; return their names."""
    for name, path in side_files.items():
        try:
            shutil.copyfile(path, folder / name)
        except OSError as error:
            raise ConversionError(
                f"{path}: cannot be copied to {folder / name} ({error.strerror})"
            ) from None
    return list(side_files)
