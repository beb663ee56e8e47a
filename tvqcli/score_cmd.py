"""`tvq score`: perplexity and bits per byte of files of any length, in one streaming pass."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from tvqcli.app import (
    AlgorithmOption,
    CoordinatorOption,
    DevicesOption,
    DistributedOption,
    DtypeOption,
    ModelOption,
    NumProcessesOption,
    ProcessIdOption,
    app,
    check_output_file,
    fail,
    handle_errors,
    join_cluster,
    run_settings,
    stderr,
)

FORMATS = ("table", "json", "jsonl", "csv")
KEYS = ("file", "bytes", "tokens", "nll", "perplexity", "bits_per_token", "bits_per_byte")


def open_input(name: str):
    if name == "-":
        return sys.stdin.buffer
    path = Path(name)
    if path.is_dir():
        raise fail(f"{name} is a directory")
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise fail(f"{name} does not exist") from None
    except OSError as e:
        raise fail(f"{name} cannot be read: {e.strerror}") from None


def total_row(scores) -> dict:
    from tvq.scoring.stats import FileScore

    return FileScore.total(scores).row()


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

    table = Table(title="partial results (interrupted)" if partial else None)
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


@app.command()
@handle_errors
def score(
    files: Annotated[list[str], typer.Argument(help="Files to score ('-' reads stdin).")],
    model: ModelOption = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="table, json, jsonl or csv.",
            show_default="table on a terminal, else jsonl",
        ),  # fmt: skip
    ] = None,
    per_token: Annotated[
        Path | None, typer.Option(help="Write each token's text, byte offset and log-prob (JSONL).")
    ] = None,
    top_logprobs: Annotated[
        int,
        typer.Option(
            help="With --per-token: also the K most likely tokens at each position "
            "(top_logprobs: text, id and log-prob).",
            min=0,
        ),
    ] = 0,
    load_state: Annotated[Path | None, typer.Option(help="Continue from a saved state.")] = None,
    save_state: Annotated[Path | None, typer.Option(help="Save the state after the text.")] = None,
    block_len: Annotated[int | None, typer.Option(help="Block length (speed only).")] = None,
    devices: DevicesOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Files scored at once per device (continuous batching) "
            "(default: 1 on a CPU, which is busy with one; 8 on a GPU).",
            min=1,
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            help="Score in windows of N tokens, each from a fresh state "
            "(default: full context from the first token).",
            min=1,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            help="With --window: windows advance by S tokens, each token scored "
            "once with its window's context (strided perplexity).",
            min=1,
        ),
    ] = None,
    by_position: Annotated[
        bool,
        typer.Option(
            "--by-position",
            help="NLL and bits per byte per token-position bucket "
            "(0-128, 128-256, ... doubling): the long-context curve.",
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Draw bits per byte against token position (log axis) into FILE.png or "
            "FILE.svg, one line per file, dashed for the baseline (needs matplotlib: "
            "pip install 'tvq[plot]').",
        ),
    ] = None,
    no_agg_cache: Annotated[
        bool,
        typer.Option(
            "--no-agg-cache",
            help="Switch the aggregate cache off (window attention only), for ablations.",
        ),
    ] = False,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Compare with another model (a directory, or 'builtin') in the "
            "same pass: KL divergence, delta NLL, top-1 agreement."
        ),
    ] = None,
    baseline_no_agg_cache: Annotated[
        bool,
        typer.Option(
            "--baseline-no-agg-cache",
            help="The baseline without its aggregate cache (default baseline: this model).",
        ),
    ] = False,
    algorithm: AlgorithmOption = None,
    dtype: DtypeOption = None,
    sequence_parallel: Annotated[
        bool | None,
        typer.Option(
            "--sequence-parallel/--no-sequence-parallel",
            help="Spread each text over the devices, a run of blocks on each (same "
            "numbers) (default: on for one file on several GPUs).",
        ),
    ] = None,
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
    distributed: DistributedOption = None,
) -> None:
    """Score files: NLL, perplexity, bits per token and bits per byte, per file and in total.

    Also words, word perplexity, and the NLL's standard error (batch means over
    256-token blocks) with a 95% interval of the perplexity.

    Several files are scored together, --batch-size per device on every
    device, a row taking the next file when its own ends; the numbers are
    those of scoring each file alone. With --coordinator (or --distributed
    auto) the files are shared out among the processes and process 0
    prints the table. --sequence-parallel spreads one long text over the
    devices instead (docs/DESIGN.md section 12)."""
    import tvq
    from tvq.dist import cluster
    from tvq.runtime.context import require_tokenizer
    from tvq.runtime.statefile import load_state as read_state
    from tvq.runtime.statefile import save_state as write_state
    from tvq.scoring.stream import score_stream
    from tvq.text.tokenizer import top_entries

    fmt = fmt or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", 2)
    if save_state is not None and len(files) != 1:
        raise fail("--save-state takes one input (the state after that text)", 2)
    if block_len is not None and block_len < 1:
        raise fail(f"--block-len must be >= 1, got {block_len}", 2)
    if files.count("-") > 1:
        raise fail("'-' (stdin) can be scored once", 2)
    if top_logprobs and per_token is None:
        raise fail("--top-logprobs needs --per-token FILE (it adds to each token's row)", 2)
    if stride is not None and window is None:
        raise fail("--stride needs --window", 2)
    if stride is not None and stride > window:
        raise fail(f"--stride ({stride}) must not exceed --window ({window})", 2)
    comparing = baseline is not None or baseline_no_agg_cache
    if comparing and (load_state is not None or save_state is not None):
        raise fail("--baseline starts both models at the start: it takes no --load-state or "
                   "--save-state", 2)  # fmt: skip
    if window is not None and (load_state is not None or save_state is not None):
        raise fail("--window scores from fresh states: it takes no --load-state or "
                   "--save-state", 2)  # fmt: skip
    check_output_file(per_token, "--per-token")
    check_output_file(plot, "--plot")
    if plot is not None:
        from tvq.scoring.plot import check_plot

        try:
            check_plot(plot)
        except tvq.TvqError as e:
            raise fail(f"--plot: {e}", 2) from None
    check_output_file(save_state, "--save-state")
    streams = [open_input(name) for name in files]  # every path is checked before work starts
    join_cluster(coordinator, num_processes, process_id, distributed)
    if cluster.active() and (per_token is not None or save_state is not None or "-" in files
                             or sequence_parallel or window is not None or comparing):  # fmt: skip
        raise fail("--per-token, --save-state, --window, --baseline, --sequence-parallel "
                   "and '-' (stdin) score in one process; leave out the cluster options",
                   2)  # fmt: skip
    base = tvq.load(model)  # state files belong to its parameters, whatever the settings
    tokenizer = require_tokenizer(base)
    if top_logprobs > base.config.n_vocab:
        raise fail(f"--top-logprobs must be at most the vocabulary size "
                   f"{base.config.n_vocab}, got {top_logprobs}", 2)  # fmt: skip
    start = read_state(load_state, base) if load_state is not None else None
    loaded = run_settings(base, algorithm, dtype)
    if no_agg_cache:  # same parameters, the window alone
        loaded = loaded.with_agg_cache(False)
    other = _baseline(tvq, baseline, loaded, baseline_no_agg_cache) if comparing else None
    if sequence_parallel is None:  # on where it pays: one text, several accelerators
        sequence_parallel = len(files) == 1 and _accelerators(devices) > 1
    if sequence_parallel:
        loaded = _spread(loaded, devices)
    per_token_file = None
    if per_token is not None:
        try:
            per_token_file = per_token.open("w", encoding="utf-8")
        except OSError as e:
            raise fail(f"{per_token} cannot be written: {e.strerror}") from None

    scores, stopped, context, name = [], None, None, files[0]
    curve = by_position or plot is not None  # the position buckets, shown or drawn
    progress = _Progress(sum(_size(f) for f in files))
    batched = cluster.active() or (
        len(files) > 1 and per_token is None and save_state is None and not sequence_parallel
        and window is None and not comparing
    )  # fmt: skip
    try:
        if batched:
            scores, stopped = _score_together(
                loaded, files, streams, progress, devices=devices, rows=batch_size,
                block_len=block_len, start=start, by_position=curve,
            )  # fmt: skip
            if not cluster.is_main():
                return  # process 0 prints the results of all
        for name, stream in zip(files, streams, strict=True):
            if batched:
                break

            def on_tokens(ids, log_probs, offset, top, name=name):
                lines = []
                for t, (token, lp) in enumerate(zip(ids, log_probs, strict=True)):
                    piece = tokenizer.token_bytes(token)
                    row = {
                        "file": name,
                        "token": piece.decode("utf-8", errors="replace"),
                        "id": int(token),
                        "offset": offset,
                        "logprob": round(float(lp), 6),
                    }
                    if top is not None:
                        row["top_logprobs"] = top_entries(tokenizer, top[1][t], top[0][t])
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                    offset += len(piece)
                try:
                    per_token_file.writelines(lines)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(per_token)) from None

            result, context = score_stream(
                loaded, stream, "<stdin>" if name == "-" else name, block_len=block_len,
                context=start, on_piece=progress.update,
                on_tokens=on_tokens if per_token_file else None, window=window, stride=stride,
                by_position=curve, baseline=other, top_logprobs=top_logprobs,
            )  # fmt: skip
            progress.finish_file(result)
            scores.append(result)
            if result.invalid_utf8:
                stderr.print(f"warning: {name} is not valid UTF-8; "
                             "decoded with replacement characters", highlight=False)  # fmt: skip
    except KeyboardInterrupt:
        stopped = ("interrupted: the results above are partial", 130)
    except OSError as e:  # reading an input or writing --per-token failed part-way
        where = e.filename or name
        stopped = (f"{where}: {e.strerror or e}; the results above are partial", 1)
    finally:
        progress.close()
        for stream in streams:
            if stream is not sys.stdin.buffer:
                stream.close()
        if per_token_file is not None:
            try:
                per_token_file.close()
            except OSError:
                stopped = stopped or (f"{per_token} cannot be written", 1)
    partial = stopped is not None
    current = progress.current
    if partial and current is not None and current not in scores:
        scores.append(current)

    drawn = [s.row() for s in scores] + [total_row(scores)]
    rows = drawn if by_position else [
        {k: v for k, v in r.items() if k not in ("by_position", "baseline_by_position")}
        for r in drawn
    ]  # fmt: skip
    if fmt == "table":
        print_table(rows, partial)
    else:
        sys.stdout.write(render(rows, fmt, partial))
        sys.stdout.flush()
    if plot is not None:
        label = "baseline"
        if baseline_no_agg_cache:
            label = "no aggregate cache" if baseline is None else "baseline, no aggregate cache"
        _draw(drawn, plot, partial, label)
    if stopped is not None:
        message, code = stopped
        if code == 130:
            stderr.print(message, highlight=False)
            raise typer.Exit(code)
        raise fail(message, code)
    if save_state is not None and context is not None:
        write_state(save_state, base, context)


def _draw(rows: list[dict], path: Path, partial: bool, baseline_label: str) -> None:
    from tvq.scoring.plot import plot_by_position

    try:
        plot_by_position(rows, path, "partial results (interrupted)" if partial else None,
                         baseline_label)  # fmt: skip
    except OSError as e:
        raise fail(f"--plot {path} cannot be written: {e.strerror or e}") from None


def _baseline(tvq, name: str | None, model, no_agg_cache: bool):
    """The baseline model: a directory, 'builtin', or (None) this model itself; checked
    against the model's tokenizer before any work."""

    from tvq.scoring.compare import check_baseline

    if name is None:
        other = model
    elif name == "builtin" and not Path(name).exists():
        other = tvq.load()
    else:
        other = tvq.load(name)
    if no_agg_cache:
        other = other.with_agg_cache(False)
    check_baseline(model, other)
    return other


def _accelerators(devices: int | None) -> int:
    """Local accelerator devices the command may use (0 on a CPU)."""
    import jax

    if jax.default_backend() == "cpu":
        return 0
    count = len(jax.local_devices())
    return count if devices is None else min(devices, count)


def _spread(model, devices: int | None):
    """The model with each text spread over `devices` local devices (None: all)."""
    import dataclasses

    import jax

    count = len(jax.local_devices()) if devices is None else devices
    if count > len(jax.local_devices()):
        raise fail(f"--devices must be between 1 and {len(jax.local_devices())} "
                   f"(the devices JAX sees), got {count}", 2)  # fmt: skip
    return dataclasses.replace(model, sequence_devices=count)


def _score_together(loaded, files, streams, progress, *, devices, rows, block_len, start,
                    by_position):  # fmt: skip
    """Continuous batching over the devices, and over the processes of a cluster (each
    scores every P-th file); → (scores in the input order, stop reason or None)."""
    import jax

    from tvq.dist import cluster
    from tvq.scoring.batching import BatchScorer
    from tvq.scoring.stats import FileScore

    share = list(range(jax.process_index(), len(files), jax.process_count()))
    names = ["<stdin>" if files[i] == "-" else files[i] for i in share]
    scorer = BatchScorer(loaded, [(names[k], streams[i]) for k, i in enumerate(share)],
                         rows_per_device=rows, devices=devices, block_len=block_len,
                         start=start, by_position=by_position)  # fmt: skip
    stopped = None
    try:
        scorer.run(on_step=progress.set_done)
    except KeyboardInterrupt:
        stopped = ("interrupted: the results above are partial", 130)
    except OSError as e:  # reading an input failed part-way
        stopped = (f"{e.filename or 'input'}: {e.strerror or e}; the results above are partial", 1)
    mine = [dict(dataclasses.asdict(score), index=share[k]) for k, score in scorer.begun()]
    shared = cluster.gather("score", {"scores": mine, "stopped": stopped})
    if shared is None:
        return [], None
    merged = sorted((s for part in shared for s in part["scores"]), key=lambda s: s["index"])
    stops = [part["stopped"] for part in shared if part["stopped"]]
    for score in merged:
        if score["invalid_utf8"]:
            stderr.print(f"warning: {score['file']} is not valid UTF-8; "
                         "decoded with replacement characters", highlight=False)  # fmt: skip
    scores = [FileScore(**{k: v for k, v in s.items() if k != "index"}) for s in merged]
    return scores, (tuple(stops[0]) if stops else None)


def _size(name: str) -> int:
    try:
        return Path(name).stat().st_size if name != "-" else 0
    except OSError:
        return 0


SHOW_EVERY_S = 0.25  # the running bits per byte, refreshed at most this often


class _Progress:
    """On stderr, only when it is a terminal: bytes done, the running bits per byte of
    everything scored so far (all files together) with its ± (1.96 standard errors)
    and an ETA."""

    def __init__(self, total_bytes: int) -> None:
        self.current = None
        self.finished: list = []  # scores of the files done
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
            self.task = self.bar.add_task("score", total=total_bytes or None, bpb="-")

    def update(self, result) -> None:
        """The current file's score so far (sequential scoring)."""
        self.current = result
        self._show(sum(s.bytes for s in self.finished) + result.bytes,
                   lambda: self.finished + [result])  # fmt: skip

    def set_done(self, done_bytes: int, begun) -> None:
        """Bytes read, and begun() → (index, score) of every text so far (batched)."""
        self._show(done_bytes, lambda: [score for _, score in begun()])

    def finish_file(self, result) -> None:
        self.finished.append(result)
        self.current = None

    def _show(self, done_bytes: int, scores) -> None:
        """scores() is asked only on a terminal, at most every SHOW_EVERY_S seconds:
        pooling every file's score costs time in the number of files."""
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self.shown_at >= SHOW_EVERY_S:
            self.shown_at = now
            self.bar.update(self.task, bpb=running_bpb(scores()))
        self.bar.update(self.task, completed=done_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def running_bpb(scores: list) -> str:
    """Bits per byte of the scores together, "2.1234 ± 0.0123" (± 1.96 standard errors
    of the mean token NLL, in bits per byte), "-" before any byte."""
    from tvq.scoring.stats import FileScore

    total = FileScore.total(scores)
    if not total.bytes or not total.tokens:
        return "-"
    row = total.row()
    text = f"{row['bits_per_byte']:.4f}"
    if row["nll_stderr"] is not None:
        spread = 1.96 * row["nll_stderr"] * total.tokens / total.bytes / math.log(2)
        text += f" ± {spread:.4f}"
    return text
