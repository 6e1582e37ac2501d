"""One size grammar for every option that takes bytes (serve's cache size, quantize's shards)."""

from __future__ import annotations

import pytest
import typer

from qwen3_mlx.cli.serve_cmd import parse_size as serve_size
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.quantize.plan import parse_size as shard_size
from qwen3_mlx.sizes import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4g", 4 * 10**9),
        ("4GB", 4 * 10**9),
        ("4 gb", 4 * 10**9),
        ("2GiB", 2 * 2**30),
        ("2gi", 2 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5k", 1500),
        ("100", 100),
        ("100b", 100),
        (7, 7),
    ],
)
def test_one_grammar_everywhere(text, expected):
    assert parse_size(text) == serve_size(str(text)) == shard_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "4x", "gb", "4 i", "-1GB", "4GiBs"])
def test_bad_sizes_are_refused_in_each_voice(text):
    with pytest.raises(ValueError, match="is not a size like 4GiB"):
        parse_size(text)
    with pytest.raises(typer.BadParameter, match="is not a size like 4GiB"):
        serve_size(text)
    with pytest.raises(Qwen3Error, match="bad shard size"):
        shard_size(text)


def test_a_shard_size_must_be_positive():
    with pytest.raises(Qwen3Error, match="more than 0 bytes"):
        shard_size("0MB")
