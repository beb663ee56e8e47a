"""The long-context curve as a picture: bits per byte against token position, one line
per text (and a dashed one per baseline), on a log axis (`tvq score --plot`).

matplotlib is an optional extra (`pip install 'tvq[plot]'`); check_plot says before any
work whether a picture can be drawn.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from tvq.errors import InputError

PLOT_FORMATS = (".png", ".svg")


def check_plot(path: str | os.PathLike) -> Path:
    """The picture's path, or InputError: a .png or .svg name, and matplotlib installed."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise InputError(f"a plot is written as .png or .svg, got {path.name!r}")
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("plotting needs matplotlib: pip install 'tvq[plot]' "
                         "(or pip install matplotlib)")  # fmt: skip
    return path


def plot_by_position(
    rows: list[dict], path: str | os.PathLike, title: str | None = None,
    baseline_label: str = "baseline",
) -> None:  # fmt: skip
    """Draws score rows (tvq.scoring.stream.FileScore.row with by_position) into path: each
    bucket's bits per byte as a step over its positions [start, end), solid for the
    model and dashed for the baseline (baseline_by_position, named baseline_label in the
    legend) in the same colour. With several texts the TOTAL row is drawn too, in black;
    with one it equals the text."""
    path = check_plot(path)
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    texts = [r for r in rows if r["file"] != "TOTAL"]
    drawn = texts + [r for r in rows if r["file"] == "TOTAL" and len(texts) != 1]
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for index, row in enumerate(drawn):
        colour = "black" if row["file"] == "TOTAL" else f"C{index % 10}"
        lines = (("by_position", "-", ""), ("baseline_by_position", "--", f" ({baseline_label})"))
        for key, style, suffix in lines:
            buckets = row.get(key)
            if not buckets:
                continue
            edges = [max(buckets[0]["start"], 1)] + [b["end"] for b in buckets]
            values = [math.nan if b["bits_per_byte"] is None else b["bits_per_byte"]
                      for b in buckets]  # fmt: skip
            axes.stairs(values, edges, baseline=None, color=colour, linestyle=style,
                        linewidth=2 if row["file"] == "TOTAL" else 1.5,
                        label=f"{row['file']}{suffix}")  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _tokens(x)))
    axes.set_xlabel("token position")
    axes.set_ylabel("bits per byte")
    axes.set_title(title or "bits per byte by token position")
    axes.grid(True, which="major", alpha=0.3)
    if drawn:
        axes.legend(fontsize="small")
    figure.savefig(path)


def _tokens(x: float) -> str:
    """A position as 1, 128, 4k, 2M."""
    for scale, suffix in ((2**20, "M"), (2**10, "k")):
        if x >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"
