"""What `tvq score` shows: the rows as a table, JSON, JSONL or CSV, the per-token JSONL
file, the plot of the long-context curve and the progress line on stderr.

tvq modules are imported inside the functions that need them (never JAX at the top), so
that `tvq --help` stays fast."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path

from tvqcli.app import fail, stderr

FORMATS = ("table", "json", "jsonl", "csv")
KEYS = ("file", "bytes", "tokens", "nll", "perplexity", "bits_per_token", "bits_per_byte")
CURVES = ("by_position", "baseline_by_position")  # shown with --by-position only
PARTIAL_TITLE = "partial results (interrupted)"


# -- the results ----------------------------------------------------------------------------


def print_results(rows: list[dict], fmt: str, partial: bool, by_position: bool) -> None:
    """The rows on stdout in `fmt`, without the curves unless by_position."""
    if not by_position:
        rows = [{k: v for k, v in r.items() if k not in CURVES} for r in rows]
    if fmt == "table":
        print_table(rows, partial)
    else:
        sys.stdout.write(render(rows, fmt, partial))
        sys.stdout.flush()


def render(rows: list[dict], fmt: str, partial: bool) -> str:
    if partial:
        rows = [dict(r, partial=True) for r in rows]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    raise ValueError(fmt)


def sparkline(values: list[float | None]) -> str:
    """A one-line picture of values (blank where None), low ▁ to high █."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(" " if v is None else bars[round((v - low) / (high - low or 1) * 7)]
                   for v in values)  # fmt: skip


def print_table(rows: list[dict], partial: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=PARTIAL_TITLE if partial else None)
    curve = "by_position" in rows[0]
    for key in KEYS + (("bits/byte by position",) if curve else ()):
        table.add_column(key, justify="left" if key == "file" else "right")
    for r in rows:
        spread = "" if r["nll_stderr"] is None else f" ± {r['nll_stderr']:.4f}"
        cells = [r["file"], f"{r['bytes']:,}", f"{r['tokens']:,}", f"{r['nll']:.4f}{spread}",
                 f"{r['perplexity']:.3f}", f"{r['bits_per_token']:.4f}",
                 f"{r['bits_per_byte']:.4f}"]  # fmt: skip
        if curve:
            cells.append(sparkline([b["bits_per_byte"] for b in r["by_position"]]))
        table.add_row(*cells)
    Console().print(table)


def warn_not_utf8(name: str) -> None:
    stderr.print(f"warning: {name} is not valid UTF-8; "
                 "decoded with replacement characters", highlight=False)  # fmt: skip


# -- the plot -------------------------------------------------------------------------------


def baseline_label(baseline: str | None, baseline_no_agg_cache: bool) -> str:
    """The legend of the dashed lines."""
    if not baseline_no_agg_cache:
        return "baseline"
    return "no aggregate cache" if baseline is None else "baseline, no aggregate cache"


def draw_plot(rows: list[dict], path: Path, partial: bool, baseline_label: str) -> None:
    """--plot: bits per byte against token position, from rows with their curves."""
    from tvq.scoring.plot import plot_by_position

    try:
        plot_by_position(rows, path, PARTIAL_TITLE if partial else None, baseline_label)
    except OSError as e:
        raise fail(f"--plot {path} cannot be written: {e.strerror or e}") from None


# -- per token ------------------------------------------------------------------------------


class PerTokenWriter:
    """--per-token FILE: a JSON line per token with its file, text, id, byte offset in the
    file and log-prob (and, with --top-logprobs, the most likely tokens there)."""

    def __init__(self, path: Path, tokenizer) -> None:
        self.path, self.tokenizer = path, tokenizer
        try:
            self.file = path.open("w", encoding="utf-8")
        except OSError as e:
            raise fail(f"{path} cannot be written: {e.strerror}") from None

    def write(self, name: str, ids, log_probs, offset: int, top) -> None:
        """score_files' on_tokens: the tokens of the file `name` from byte `offset`."""
        from tvq.text.tokenizer import token_text, top_entries

        lines = []
        for t, (token, lp) in enumerate(zip(ids, log_probs, strict=True)):
            row = {
                "file": name,
                "token": token_text(self.tokenizer, token),
                "id": int(token),
                "offset": offset,
                "logprob": round(float(lp), 6),
            }
            if top is not None:
                row["top_logprobs"] = top_entries(self.tokenizer, top[1][t], top[0][t])
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            offset += len(self.tokenizer.token_bytes(token))
        try:
            self.file.writelines(lines)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> bool:
        """Closes the file; False when its last lines could not be written."""
        try:
            self.file.close()
        except OSError:
            return False
        return True


# -- progress -------------------------------------------------------------------------------


SHOW_EVERY_S = 0.25  # the running bits per byte, refreshed at most this often


class ProgressLine:
    """On stderr, only when it is a terminal: bytes done, the running bits per byte of
    everything scored so far (all files together) with its ± (1.96 standard errors)
    and an ETA; `update` is score_files' on_progress."""

    def __init__(self) -> None:
        self.bar, self.shown_at = None, float("-inf")
        if stderr.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                BarColumn(), DownloadColumn(), TextColumn("{task.fields[bpb]} bits/byte"),
                TimeRemainingColumn(), console=stderr, transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("score", total=None, bpb="-")

    def update(self, progress) -> None:
        """A tvq.scoring.job.ScoreProgress. Its scores() are asked only every SHOW_EVERY_S
        seconds: pooling every file's score costs time in the number of files."""
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self.shown_at >= SHOW_EVERY_S:
            self.shown_at = now
            self.bar.update(self.task, bpb=running_bpb(progress.scores()))
        self.bar.update(self.task, completed=progress.bytes_done,
                        total=progress.bytes_total or None)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def running_bpb(scores: list) -> str:
    """Bits per byte of the scores together, "2.1234 ± 0.0123" (± 1.96 standard errors
    of the mean token NLL, in bits per byte), "-" before any byte."""
    import tvq

    total = tvq.FileScore.total(scores)
    if not total.bytes or not total.tokens:
        return "-"
    row = total.row()
    text = f"{row['bits_per_byte']:.4f}"
    if row["nll_stderr"] is not None:
        spread = 1.96 * row["nll_stderr"] * total.tokens / total.bytes / math.log(2)
        text += f" ± {spread:.4f}"
    return text
