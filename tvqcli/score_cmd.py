"""`tvq score`: perplexity and bits per byte of files of any length, in one streaming pass.

Over 300 lines because its options and their help, a third of it, are the command's
documentation; the body is a short sequence of named steps below, and everything that
renders the results is tvqcli/score_output.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

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
from tvqcli.score_output import (
    FORMATS,
    PerTokenWriter,
    ProgressLine,
    baseline_label,
    draw_plot,
    print_results,
    result_rows,
    warn_not_utf8,
)

PARTIAL = "the results above are partial"


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
    fmt = fmt or ("table" if sys.stdout.isatty() else "jsonl")
    comparing = baseline is not None or baseline_no_agg_cache
    _check_options(files, fmt, per_token=per_token, top_logprobs=top_logprobs,
                   load_state=load_state, save_state=save_state, block_len=block_len,
                   window=window, stride=stride, comparing=comparing)  # fmt: skip
    _check_outputs(per_token, plot, save_state)
    streams = [open_input(name) for name in files]  # every path is checked before work starts
    join_cluster(coordinator, num_processes, process_id, distributed)
    _check_one_process(files, per_token=per_token, save_state=save_state, window=window,
                       sequence_parallel=sequence_parallel, comparing=comparing)  # fmt: skip
    models = _load_models(model, files, devices=devices, load_state=load_state,
                          top_logprobs=top_logprobs, algorithm=algorithm, dtype=dtype,
                          no_agg_cache=no_agg_cache, comparing=comparing, baseline=baseline,
                          baseline_no_agg_cache=baseline_no_agg_cache,
                          sequence_parallel=sequence_parallel)  # fmt: skip
    writer = PerTokenWriter(per_token, models.tokenizer) if per_token is not None else None
    batched = _batched(files, per_token=per_token, save_state=save_state, window=window,
                       sequence_parallel=models.sequence_parallel, comparing=comparing)  # fmt: skip
    outcome = _score_files(models, files, streams, writer, batched=batched, devices=devices,
                           rows=batch_size, block_len=block_len, window=window, stride=stride,
                           by_position=by_position or plot is not None,  # shown or drawn
                           top_logprobs=top_logprobs)  # fmt: skip
    if outcome is None:
        return  # process 0 prints the results of all
    rows = result_rows(outcome.scores)
    print_results(rows, fmt, outcome.partial, by_position)
    if plot is not None:
        draw_plot(rows, plot, outcome.partial, baseline_label(baseline, baseline_no_agg_cache))
    _stop(outcome.stopped)
    if save_state is not None and outcome.context is not None:
        _save_state(save_state, models.base, outcome.context)


# -- before any work: the options ------------------------------------------------------------


def _check_options(files, fmt, *, per_token, top_logprobs, load_state, save_state, block_len,
                   window, stride, comparing) -> None:  # fmt: skip
    """Usage errors (exit 2) in the options themselves."""
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
    _check_protocol(window, stride)
    if comparing and (load_state is not None or save_state is not None):
        raise fail("--baseline starts both models at the start: it takes no --load-state or "
                   "--save-state", 2)  # fmt: skip
    if window is not None and (load_state is not None or save_state is not None):
        raise fail("--window scores from fresh states: it takes no --load-state or "
                   "--save-state", 2)  # fmt: skip


def _check_protocol(window: int | None, stride: int | None) -> None:
    """--window and --stride, checked by tvq.scoring.stream.check_protocol, as a usage
    error in the words of the options."""
    from tvq.errors import InputError
    from tvq.scoring.stream import check_protocol

    try:
        check_protocol(window, stride)
    except InputError as e:
        message = str(e)  # a window or stride below 1 (Typer refuses those first)
        if window is None:
            message = "--stride needs --window"
        elif stride is not None and stride > window:
            message = f"--stride ({stride}) must not exceed --window ({window})"
        raise fail(message, 2) from None


def _check_outputs(per_token: Path | None, plot: Path | None, save_state: Path | None) -> None:
    """The files to write can be written (and --plot has a picture format it can draw)."""
    check_output_file(per_token, "--per-token")
    check_output_file(plot, "--plot")
    if plot is not None:
        from tvq.errors import TvqError
        from tvq.scoring.plot import check_plot

        try:
            check_plot(plot)
        except TvqError as e:
            raise fail(f"--plot: {e}", 2) from None
    check_output_file(save_state, "--save-state")


def _check_one_process(files, *, per_token, save_state, window, sequence_parallel,
                       comparing) -> None:  # fmt: skip
    """In a cluster, none of the options that score in one process."""
    from tvq.distributed import cluster

    if cluster.active() and (per_token is not None or save_state is not None or "-" in files
                             or sequence_parallel or window is not None or comparing):  # fmt: skip
        raise fail("--per-token, --save-state, --window, --baseline, --sequence-parallel "
                   "and '-' (stdin) score in one process; leave out the cluster options",
                   2)  # fmt: skip


# -- the models -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Models:
    base: Any  # as loaded: state files belong to its parameters, whatever the settings
    tokenizer: Any
    run: Any  # with the speed settings, the aggregate cache option, the devices
    baseline: Any  # None unless comparing
    start: Any  # the --load-state context, or None
    sequence_parallel: bool


def _load_models(model, files, *, devices, load_state, top_logprobs, algorithm, dtype,
                 no_agg_cache, comparing, baseline, baseline_no_agg_cache,
                 sequence_parallel) -> _Models:  # fmt: skip
    """The model, the start state and the baseline, checked against each other."""
    import tvq
    from tvq.runtime.context import require_tokenizer
    from tvq.runtime.statefile import load_state as read_state

    base = tvq.load(model)
    tokenizer = require_tokenizer(base)
    if top_logprobs > base.config.n_vocab:
        raise fail(f"--top-logprobs must be at most the vocabulary size "
                   f"{base.config.n_vocab}, got {top_logprobs}", 2)  # fmt: skip
    start = read_state(load_state, base) if load_state is not None else None
    loaded = run_settings(base, algorithm, dtype)
    if no_agg_cache:  # same parameters, the window alone
        loaded = loaded.with_agg_cache(False)
    other = _baseline(baseline, loaded, baseline_no_agg_cache) if comparing else None
    if sequence_parallel is None:  # on where it pays: one text, several accelerators
        sequence_parallel = len(files) == 1 and _accelerators(devices) > 1
    if sequence_parallel:
        loaded = _spread(loaded, devices)
    return _Models(base, tokenizer, loaded, other, start, sequence_parallel)


def _baseline(name: str | None, model, no_agg_cache: bool):
    """The baseline model: a directory, 'builtin', or (None) this model itself; checked
    against the model's tokenizer before any work."""
    import tvq
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
    import jax

    count = len(jax.local_devices()) if devices is None else devices
    if count > len(jax.local_devices()):
        raise fail(f"--devices must be between 1 and {len(jax.local_devices())} "
                   f"(the devices JAX sees), got {count}", 2)  # fmt: skip
    return dataclasses.replace(model, sequence_devices=count)


# -- scoring --------------------------------------------------------------------------------


def _batched(files, *, per_token, save_state, window, sequence_parallel, comparing) -> bool:
    """Continuous batching for several files (always in a cluster), unless an option needs
    them one after another."""
    from tvq.distributed import cluster

    return cluster.active() or (
        len(files) > 1 and per_token is None and save_state is None and not sequence_parallel
        and window is None and not comparing
    )  # fmt: skip


@dataclasses.dataclass
class _Outcome:
    scores: list = dataclasses.field(default_factory=list)
    stopped: tuple[str, int] | None = None  # (message, exit code) when it stopped part-way
    context: Any = None  # the state after the last text (--save-state)
    name: str = ""  # the file being scored, for an error reading it

    @property
    def partial(self) -> bool:
        return self.stopped is not None


def _score_files(models: _Models, files, streams, writer, *, batched, devices, rows, block_len,
                 window, stride, by_position, top_logprobs) -> _Outcome | None:  # fmt: skip
    """Scores the files, together or one by one. Ctrl-C, a failed read or a failed
    --per-token write stops it with the results so far (the current file's too), marked
    partial. Closes the inputs and --per-token. None on processes other than 0."""
    from tvq.distributed import cluster

    progress = ProgressLine(sum(_size(f) for f in files))
    done = _Outcome(name=files[0])
    try:
        if batched:
            done.scores, done.stopped = _score_together(
                models.run, files, streams, progress, devices=devices, rows=rows,
                block_len=block_len, start=models.start, by_position=by_position,
            )  # fmt: skip
            if not cluster.is_main():
                return None
        else:
            _score_one_by_one(models, files, streams, progress, writer, done,
                              block_len=block_len, window=window, stride=stride,
                              by_position=by_position, top_logprobs=top_logprobs)  # fmt: skip
    except KeyboardInterrupt:
        done.stopped = (f"interrupted: {PARTIAL}", 130)
    except OSError as e:  # reading an input or writing --per-token failed part-way
        done.stopped = (f"{e.filename or done.name}: {e.strerror or e}; {PARTIAL}", 1)
    finally:
        progress.close()
        for stream in streams:
            if stream is not sys.stdin.buffer:
                stream.close()
        if writer is not None and not writer.close():
            done.stopped = done.stopped or (f"{writer.path} cannot be written", 1)
    current = progress.current
    if done.partial and current is not None and current not in done.scores:
        done.scores.append(current)
    return done


def _score_one_by_one(models: _Models, files, streams, progress, writer, done: _Outcome, *,
                      block_len, window, stride, by_position, top_logprobs) -> None:  # fmt: skip
    """Each file in turn, from the start state, into done.scores (done.context: the state
    after the last)."""
    from tvq.scoring.stream import score_stream

    for name, stream in zip(files, streams, strict=True):
        done.name = name
        result, done.context = score_stream(
            models.run, stream, "<stdin>" if name == "-" else name, block_len=block_len,
            context=models.start, on_piece=progress.update,
            on_tokens=writer.on_tokens(name) if writer is not None else None, window=window,
            stride=stride, by_position=by_position, baseline=models.baseline,
            top_logprobs=top_logprobs,
        )  # fmt: skip
        progress.finish_file(result)
        done.scores.append(result)
        if result.invalid_utf8:
            warn_not_utf8(name)


def _score_together(loaded, files, streams, progress, *, devices, rows, block_len, start,
                    by_position):  # fmt: skip
    """Continuous batching over the devices, and over the processes of a cluster (each
    scores every P-th file); → (scores in the input order, stop reason or None)."""
    import jax

    from tvq.distributed import cluster
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
        stopped = (f"interrupted: {PARTIAL}", 130)
    except OSError as e:  # reading an input failed part-way
        stopped = (f"{e.filename or 'input'}: {e.strerror or e}; {PARTIAL}", 1)
    mine = [dict(dataclasses.asdict(score), index=share[k]) for k, score in scorer.begun()]
    shared = cluster.gather("score", {"scores": mine, "stopped": stopped})
    if shared is None:
        return [], None
    merged = sorted((s for part in shared for s in part["scores"]), key=lambda s: s["index"])
    stops = [part["stopped"] for part in shared if part["stopped"]]
    for score in merged:
        if score["invalid_utf8"]:
            warn_not_utf8(score["file"])
    scores = [FileScore(**{k: v for k, v in s.items() if k != "index"}) for s in merged]
    return scores, (tuple(stops[0]) if stops else None)


def _size(name: str) -> int:
    try:
        return Path(name).stat().st_size if name != "-" else 0
    except OSError:
        return 0


# -- after the results ----------------------------------------------------------------------


def _stop(stopped: tuple[str, int] | None) -> None:
    """A run that stopped part-way ends, after its partial results, with one line on
    stderr and its exit code: 130 for Ctrl-C, else the error's."""
    if stopped is None:
        return
    message, code = stopped
    if code == 130:
        stderr.print(message, highlight=False)
        raise typer.Exit(code)
    raise fail(message, code)


def _save_state(path: Path, model, context) -> None:
    from tvq.runtime.statefile import save_state

    save_state(path, model, context)
