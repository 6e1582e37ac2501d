"""Side files: only regular files inside the source folder reach the output; a broken tokenizer
file is refused before any conversion work (issue 12)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from test_quantize import cli_app, leftovers
from typer.testing import CliRunner

from qwen3_mlx.quantize import quantize_checkpoint
from qwen3_mlx.quantize.side_files import SkippedSideFileWarning

MakeCheckpoint = Callable[..., Path]
runner = CliRunner()


def test_a_license_linked_outside_the_folder_is_not_copied(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src", tokenizer="qwen3-4b")
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (source / "LICENSE").symlink_to(secret)
    (source / "NOTICE").symlink_to(source / "nowhere")
    result = runner.invoke(cli_app(), ["quantize", str(source), str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"Warning: {source / 'LICENSE'}: is a link to {secret}, outside the model folder; not copied",
        f"Warning: {source / 'NOTICE'}: is a link to {source / 'nowhere'}, which does not exist; "
        "not copied",
    ]
    out = tmp_path / "out"
    assert not (out / "LICENSE").exists() and not (out / "NOTICE").exists()
    assert all(b"PRIVATE KEY" not in path.read_bytes() for path in out.iterdir())
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


def test_a_link_inside_the_folder_is_copied_as_a_regular_file(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    (source / "licenses").mkdir()
    (source / "licenses" / "apache-2.0.txt").write_text("Apache License 2.0")
    (source / "LICENSE").symlink_to("licenses/apache-2.0.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quantize_checkpoint(source, tmp_path / "out")
    assert [w for w in caught if issubclass(w.category, SkippedSideFileWarning)] == []
    copied = result.output / "LICENSE"
    assert not copied.is_symlink() and copied.read_text() == "Apache License 2.0"


@pytest.mark.parametrize("broken", ["dangling", "outside", "folder"])
def test_a_broken_tokenizer_file_is_refused_before_any_work(
    make_checkpoint: MakeCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
) -> None:
    import qwen3_mlx.quantize.convert as convert_module

    source = make_checkpoint("src", tokenizer="qwen3-4b")
    tokenizer = source / "tokenizer.json"
    tokenizer.unlink()
    if broken == "dangling":
        tokenizer.symlink_to("../shared/tokenizer.json")
        problem = f"is a link to {tmp_path / 'shared' / 'tokenizer.json'}, which does not exist"
    elif broken == "outside":
        (tmp_path / "home-notes.json").write_text("{}")
        tokenizer.symlink_to(tmp_path / "home-notes.json")
        problem = f"is a link to {tmp_path / 'home-notes.json'}, outside the model folder"
    else:
        tokenizer.mkdir()
        problem = "is not a regular file"

    def no_work(*args: object) -> None:
        raise AssertionError("conversion started")

    monkeypatch.setattr(convert_module, "write_weights", no_work)
    output = tmp_path / "models" / "out"
    result = runner.invoke(cli_app(), ["quantize", str(source), str(output)])
    assert result.exit_code == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"Error: {tokenizer}: {problem}; the output would have no usable tokenizer "
        "(put the real file in the model folder)"
    ]
    assert not (tmp_path / "models").exists() and leftovers(tmp_path) == []


def test_hugging_face_cache_links_into_blobs_are_copied(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """The HF cache stores snapshots/REV/FILE as links to ../../blobs/HASH: those are fine."""
    built = make_checkpoint("built", tokenizer="qwen3-4b")
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, path in enumerate(sorted(built.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    result = quantize_checkpoint(snapshot, tmp_path / "out")
    names = {path.name for path in result.output.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert not any(path.is_symlink() for path in result.output.iterdir())


def test_library_warns_with_its_own_category(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    (tmp_path / "elsewhere.txt").write_text("not for upload")
    (source / "LICENSE").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.warns(SkippedSideFileWarning, match="outside the model folder; not copied"):
        result = quantize_checkpoint(source, tmp_path / "out")
    assert not (result.output / "LICENSE").exists()
