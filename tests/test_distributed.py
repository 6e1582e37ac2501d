"""Tensor parallelism over 2 ranks on this machine: `mlx.launch -n 2 --backend ring` over loopback.

One launch per module runs every comparison, the misconfigurations that need a group and a
`prompt` through the CLI (tests/distributed_ranks.py: each rank reports what it saw and printed);
a rank whose peer never comes is started by hand (MLX_RANK and a hostfile, as mlx.launch does).
Every process has a timeout: nothing here can hang CI. Each rank process costs seconds of imports
(mlx-lm, transformers, torch), so there are three.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
import pytest
from checkpoints import make_checkpoint
from distributed_ranks import PROMPT_ARGS, QUESTION, TINY_CHAT
from mlx.utils import tree_flatten

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.loading import load_model
from qwen3_mlx.parallel.sharding import ShardingError, shard_plan
from qwen3_mlx.quant import QuantSpec, quantize_model, write_quantization

TESTS = Path(__file__).parent
REPO = TESTS.parent
TIMEOUT = 300  # seconds per launch: generous for a loaded CI machine, still no hang
# The native kernels with float32 x: the parity checks hold sharded logits to float32 rounding of
# the whole model's. With int8 x (the default) they differed by 0.08 here.
ENV = {
    **os.environ,
    "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}",
    "QWEN3_MLX_NATIVE_INT8": "0",
    "QWEN3_MLX_NATIVE_INT8_PREFILL": "0",
}


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (mlx.launch and the ring take consecutive ones from the first)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count >= 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return list(range(first, first + count))
        except OSError:
            continue
        finally:
            for held_socket in held:
                held_socket.close()
    raise RuntimeError("no free ports")


def launch(command: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    """Run command on `ranks` local ranks under mlx.launch (ring backend, loopback)."""
    port = free_ports(ranks)[0]
    launcher = Path(sys.executable).with_name("mlx.launch")
    return subprocess.run(
        [str(launcher), "-n", str(ranks), "--backend", "ring", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=ENV,
    )


def start_group(
    command: list[str], stdout: Any, stderr: Any, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `mlx.launch -n 2 --backend ring` of a qwen3-mlx command in a session of its own
    (os.killpg(pid, SIGINT) is then Ctrl-C at its terminal)."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    ring = ["-n", "2", "--backend", "ring", "-p", str(free_ports(2)[0]), "--"]
    qwen3_mlx = str(Path(sys.executable).with_name("qwen3-mlx"))
    return subprocess.Popen(
        [str(launcher), *ring, qwen3_mlx, *command],
        env={**ENV, **(extra_env or {})},
        # A pipe never written to, like a terminal nobody types at. Not /dev/null: mlx.launch
        # (mlx 0.32) then reads EOF ten times a second and puts it on a queue, and a SIGINT that
        # lands inside that queue's lock leaves it held: its I/O threads block, and it hangs
        # after both ranks exited (seen here about once in ten runs under load).
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


def start_ranks(commands: list[list[str]], extra_env: dict[str, str] | None = None) -> list[Any]:
    """Start one process per command as the ranks of a ring (some may never be started: None)."""
    ports = free_ports(len(commands))
    hostfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen3-mlx-hosts-{ports[0]}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    processes = []
    for rank, command in enumerate(commands):
        env = {**ENV, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), **(extra_env or {})}
        processes.append(
            None
            if command is None
            else subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return processes


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a started rank (killed after the timeout)."""
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"a rank hung: {err[-2000:]}")
    return process.returncode, out, err


def error_lines(stderr: str) -> list[str]:
    """The `Error:` lines of a rank's stderr (MLX's ring adds its own socket notes)."""
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def quantized_copy(source: Path, target: Path) -> Path:
    """A 4-bit (group 32) MLX checkpoint of the same weights."""
    model, config = load_model(source, compute_dtype="checkpoint")
    block = quantize_model(model, QuantSpec(bits=4, group_size=32))
    target.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(target / "model.safetensors"), weights, metadata={"format": "mlx"})
    (target / "config.json").write_text(json.dumps(write_quantization(config, block)))
    return target


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Launch 2 ranks once over four random models; rank 0's comparison for each."""
    root = tmp_path_factory.mktemp("distributed")
    # 4 query heads; 1 KV head (fewer than the ranks: replicated) or 2 (one per rank). The untied
    # ones give varied greedy tokens (a tied random model repeats its input) and a vocab-split head.
    # dense-kv1 has 64-wide heads, so it also runs with an 8-bit KV cache (groups of 64).
    kv1 = make_checkpoint(
        root / "dense-kv1", num_key_value_heads=1, head_dim=64, tie_word_embeddings=False
    )
    kv2 = make_checkpoint(root / "dense-kv2", num_key_value_heads=2, seed=1)
    kv1_4bit = quantized_copy(kv1, root / "4bit-kv1")
    kv2_4bit = quantized_copy(
        make_checkpoint(root / "dense-kv2-untied", seed=2, tie_word_embeddings=False),
        root / "4bit-kv2",
    )
    three_heads = make_checkpoint(
        root / "three-heads", num_attention_heads=3, num_key_value_heads=1
    )
    out = root / "results"
    script = str(TESTS / "distributed_ranks.py")
    paths = [str(path) for path in (three_heads, kv1, kv2, kv1_4bit, kv2_4bit)]
    done = launch([sys.executable, script, str(out), *paths])
    ranks = [Path(f"{out}.{rank}.json") for rank in range(2)]
    assert all(path.exists() for path in ranks), done.stdout + done.stderr
    rank0, rank1 = (json.loads(path.read_text()) for path in ranks)
    return {**rank0, "rank1": rank1}


@pytest.mark.parametrize("name", ["dense-kv1", "dense-kv2", "4bit-kv1", "4bit-kv2"])
def test_sharded_logits_equal_single_process(parity: dict[str, Any], name: str) -> None:
    assert parity[name]["max_logit_diff"] < 1e-4


@pytest.mark.parametrize("name", ["dense-kv1", "dense-kv2"])
def test_a_rank_keeps_bf16_matrices_bf16_under_float32_compute(
    parity: dict[str, Any], name: str
) -> None:
    # As a single process: the native kernel reads them in place (half the bytes of a float32
    # copy), while the model computes in float32 (the vocabulary shard widens its lookups).
    if parity["native_dense"]:
        assert parity[name]["weight_dtypes"] == ["mlx.core.bfloat16"]
    else:
        assert parity[name]["weight_dtypes"] == ["mlx.core.float32"]
    assert parity[name]["logits_dtype"] == "mlx.core.float32"


@pytest.mark.parametrize("name", ["dense-kv1", "dense-kv2", "4bit-kv1", "4bit-kv2"])
def test_32_greedy_tokens_identical(parity: dict[str, Any], name: str) -> None:
    result = parity[name]
    assert len(result["tokens"]) == 32
    assert result["tokens"] == result["expected"]


@pytest.mark.parametrize("name", ["dense-kv1", "4bit-kv1"])
def test_greedy_tokens_identical_with_an_8_bit_kv_cache(parity: dict[str, Any], name: str) -> None:
    result = parity[name]
    assert len(result["tokens_kv8"]) == 32
    assert result["tokens_kv8"] == result["expected_kv8"]


@pytest.mark.parametrize("name", ["dense-kv1", "dense-kv2", "4bit-kv1", "4bit-kv2"])
def test_speculative_decoding_under_a_group_is_exact(parity: dict[str, Any], name: str) -> None:
    # Rank 0 verifies drafts with the followers in lockstep: every position's logits (the
    # vocabulary-split head gathers each row), rejected positions trimmed on every rank.
    result = parity[name]["speculative"]
    assert result["tokens"] == parity[name]["expected"]
    assert result["accepted"] > 0 and result["rejected"] > 0


@pytest.mark.parametrize("name", ["dense-kv1", "dense-kv2", "4bit-kv1", "4bit-kv2"])
def test_batched_decoding_tokens_identical(parity: dict[str, Any], name: str) -> None:
    # The server's decoder: rows merged into one batch (one late), extracted and dropped at
    # different steps, then a row in a fork of the first's cache.
    result = parity[name]
    assert [len(row) for row in result["batched"]] == [12, 5, 9, 4]
    assert result["batched"] == result["batched_expected"]


def test_untied_random_model_gives_varied_tokens(parity: dict[str, Any]) -> None:
    # Guards the test above: identical runs of one repeated token would prove little.
    assert len(set(parity["dense-kv1"]["expected"])) > 3


def test_plan_refuses_heads_that_do_not_split() -> None:
    args = ModelArgs.from_dict(json.loads((TINY_CHAT / "config.json").read_text()))
    with pytest.raises(ShardingError, match="4 attention heads do not split evenly over 3"):
        shard_plan(args, 0, 3)
    plan = shard_plan(args, 3, 4)  # 2 KV heads over 4 ranks: ranks 2 and 3 hold KV head 1
    assert plan["model.layers.0.self_attn.k_proj"].index == 1
    assert plan["model.layers.0.self_attn.k_proj"].count == 2


def test_prompt_under_two_ranks_prints_the_single_process_answer(parity: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from qwen3_mlx.cli.app import app

    single = CliRunner().invoke(app, [*PROMPT_ARGS, QUESTION])
    assert single.exit_code == 0, single.output
    assert single.stdout.strip()
    assert parity["prompt_exit"] == 0
    assert parity["prompt_printed"] == single.stdout
    assert parity["rank1"]["prompt_exit"] == 0
    assert parity["rank1"]["prompt_printed"] == ""  # a follower prints nothing


def test_rank_that_cannot_connect_fails_in_one_line() -> None:
    # Rank 1 never starts: rank 0 waits 2 s for it. (join_group is what every command runs first
    # under mlx.launch; this imports only it, to keep the test cheap.)
    join = "from qwen3_mlx.parallel.distributed import join_group; join_group()"
    (alone, _) = start_ranks(
        [[sys.executable, "-c", join], None], extra_env={"QWEN3_MLX_CONNECT_TIMEOUT": "2"}
    )
    code, out, err = finish(alone)
    assert code != 0
    assert error_lines(err) == [
        "Error: rank 0 could not connect to the other ranks within 2 s; check that every host "
        "in the hostfile runs the same command and can reach the others (set "
        "QWEN3_MLX_CONNECT_TIMEOUT to wait longer)"
    ]
    assert out == ""


def test_different_model_files_fail_on_every_rank(parity: dict[str, Any]) -> None:
    for seen in (parity, parity["rank1"]):
        assert seen["different_files_error"].startswith(
            "DistributedError: the ranks have different model files or settings"
        )


def test_heads_that_do_not_split_fail_on_every_rank(parity: dict[str, Any]) -> None:
    for seen in (parity, parity["rank1"]):
        assert seen["three_heads_error"] == (
            "ShardingError: 3 attention heads do not split evenly over 2 ranks; use a number of "
            "ranks that divides 3"
        )


def test_a_group_refuses_kv_cache_files() -> None:
    from qwen3_mlx.cache_file import CacheFileError, fingerprint

    class Leader:  # what fingerprint sees of distributed.LeaderModel: it has a group
        group = object()

    with pytest.raises(CacheFileError, match="cannot be saved or restored by a group of ranks"):
        fingerprint(Leader(), None, None)


def test_a_group_refuses_caches_it_cannot_mirror() -> None:
    from qwen3_mlx.errors import DistributedError
    from qwen3_mlx.parallel import lockstep
    from qwen3_mlx.parallel.lockstep import LeaderModel

    class RotatingKVCache:  # by name: the followers have no protocol for its window
        offset = 0

    leader = LeaderModel(object(), object())
    lockstep._leaders.remove(leader)  # it has no followers to stop at exit
    with pytest.raises(DistributedError, match="a RotatingKVCache cannot be used by a group"):
        leader(mx.zeros((2, 1), dtype=mx.int32), [RotatingKVCache()])


def test_auto_rope_refused_under_a_group_before_connecting() -> None:
    from typer.testing import CliRunner

    from qwen3_mlx.cli.app import app

    env = {"MLX_RANK": "0", "MLX_HOSTFILE": "/nonexistent/hosts.json"}
    args = ["prompt", "--model", str(TINY_CHAT), "--rope-scaling", "auto", "hi"]
    done = CliRunner().invoke(app, args, env=env)
    assert done.exit_code == 1
    assert done.stderr.strip() == (
        "Error: --rope-scaling auto does not run under mlx.launch (it would move rank 0's RoPE "
        "alone); use --rope-scaling yarn"
    )


def test_ctrl_c_stops_a_two_rank_prompt_on_every_rank(tmp_path: Path) -> None:
    # Ctrl-C at a terminal reaches every process of the foreground group: the launcher and both
    # ranks. Rank 1 ignores it; rank 0 stops its reply mid-stream (exit 130) and tells rank 1,
    # which exits with the same status. (Temperature 2: the tiny model rambles until stopped.)
    answer, notes = tmp_path / "stdout.log", tmp_path / "stderr.log"
    command = [
        *("prompt", "--model", str(TINY_CHAT), "--no-think", "--tools", "none"),
        *("--temp", "2", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--seed", "1"),
        *("--max-tokens", "4000", QUESTION),
    ]
    with answer.open("w") as out, notes.open("w") as err:
        launcher = start_group(command, out, err)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not answer.read_text().strip() and launcher.poll() is None:
            assert time.monotonic() < deadline, "no answer began"
            time.sleep(0.2)
        assert launcher.poll() is None, notes.read_text()[-3000:]
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=60)
        assert psutil.wait_procs(ranks, timeout=10)[1] == []
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = notes.read_text()
    for rank in (0, 1):
        assert f"Node with rank {rank} exited with code 130" in text, text[-3000:]
