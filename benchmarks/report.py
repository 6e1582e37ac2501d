"""Turn worker results into the comparison table (text and markdown), JSON and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.plan import Comparison

HIGHER_IS_BETTER = {"tok_s"}
UNITS = {"tok_s": "tok/s", "ttft": "s", "load_s": "s", "peak_gb": "GB", "help_s": "s"}


def best(results: list[dict[str, Any]], metric: str, turn: int | None = None) -> float | None:
    """The best repeat of a run: highest rate, lowest time, and the largest memory peak (the honest one)."""
    values = []
    for result in results:
        if "error" in result:
            continue
        if turn is not None:
            values += [t["ttft"] for t in result.get("turns", []) if t["turn"] == turn]
        elif metric in result:
            values.append(result[metric])
    if not values:
        return None
    if metric == "peak_gb":
        return max(values)
    return max(values) if metric in HIGHER_IS_BETTER else min(values)


def value_of(runs: dict[str, list[dict[str, Any]]], key: str, metric: str) -> float | None:
    """A metric of a run id, or of one chat turn with 'run_id#turn'."""
    run_id, _, turn = key.partition("#")
    return best(runs.get(run_id, []), metric, int(turn) if turn else None)


def advantage(metric: str, ours: float | None, theirs: float | None) -> float | None:
    """How many times better ours is (>1: ours wins): a rate ratio, or a time/memory ratio inverted."""
    if not ours or not theirs:
        return None
    return ours / theirs if metric in HIGHER_IS_BETTER else theirs / ours


def rows(
    comparisons: list[Comparison], runs: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One dict per comparison with ours, theirs and the advantage."""
    table = []
    for comparison in comparisons:
        ours = value_of(runs, comparison.ours, comparison.metric)
        theirs = value_of(runs, comparison.theirs, comparison.metric)
        table.append(
            {
                "group": comparison.group,
                "label": comparison.label,
                "metric": comparison.metric,
                "unit": UNITS[comparison.metric],
                "ours": ours,
                "theirs": theirs,
                "advantage": advantage(comparison.metric, ours, theirs),
                "note": comparison.note,
            }
        )
    return table


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def markdown(table: list[dict[str, Any]]) -> str:
    """The table as GitHub markdown (advantage > 1 means qwen3-mlx is better)."""
    lines = [
        "| group | comparison | qwen3-mlx | other | unit | advantage | note |",
        "| --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for row in table:
        ratio = f"{row['advantage']:.2f}x" if row["advantage"] else "n/a"
        lines.append(
            f"| {row['group']} | {row['label']} | {_number(row['ours'])} | {_number(row['theirs'])} "
            f"| {row['unit']} | {ratio} | {row['note']} |"
        )
    return "\n".join(lines)


def chat_table(runs: dict[str, list[dict[str, Any]]], chat_ids: dict[str, str]) -> str:
    """Per-turn TTFT and context of the three chat approaches, as markdown."""
    lines = [
        "| turn | "
        + " | ".join(f"{name} TTFT s (computed/context tokens)" for name in chat_ids)
        + " |"
    ]
    lines.append("| ---: |" + " ---: |" * len(chat_ids))
    for turn in range(1, 9):
        cells = []
        for run_id in chat_ids.values():
            entries = [
                t
                for r in runs.get(run_id, [])
                if "error" not in r
                for t in r.get("turns", [])
                if t["turn"] == turn
            ]
            if not entries:
                cells.append("-")
                continue
            fastest = min(entries, key=lambda t: t["ttft"])
            cells.append(f"{fastest['ttft']:.2f} ({fastest['computed']}/{fastest['context']})")
        lines.append(f"| {turn} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Everything measured, with the machine and versions."""
    path.write_text(json.dumps(data, indent=2, default=str))


def write_chart(path: Path, table: list[dict[str, Any]], title: str) -> bool:
    """A horizontal bar chart of the advantages (log scale); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [row for row in table if row["advantage"]]
    if not shown:
        return False
    labels = [f"{row['group']}: {row['label']}" for row in shown]
    values = [row["advantage"] for row in shown]
    figure, axis = plt.subplots(figsize=(11, 0.38 * len(shown) + 1.5))
    colors = ["tab:green" if value >= 1 else "tab:red" for value in values]
    axis.barh(range(len(shown)), values, color=colors)
    axis.set_yticks(range(len(shown)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.axvline(1.0, color="black", linewidth=0.8)
    for index, value in enumerate(values):
        axis.text(value, index, f" {value:.2f}x", va="center", fontsize=7)
    axis.set_xlabel(
        "advantage of qwen3-mlx over the other side (x, log scale; >1 = qwen3-mlx better)"
    )
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
