"""`tvq score`: perplexity and bits per byte of files of any length, in one streaming pass.

The command parses, calls the library and prints: tvq.scoring.job.score_files decides how
the files are scored (together or one by one, over devices and processes) and yields the
scores; tvqcli/score_output.py renders them. Over 300 lines because the options and their
help, a third of it, are the command's documentation (declared once, above the command).
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
    warn_not_utf8,
)

PARTIAL = "the results above are partial"


# -- the options (their help is the command's documentation) --------------------------------

FilesArgument = Annotated[list[str], typer.Argument(help="Files to score ('-' reads stdin).")]
FormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="table, json, jsonl or csv.",
        show_default="table on a terminal, else jsonl",
    ),
]
PerTokenOption = Annotated[
    Path | None, typer.Option(help="Write each token's text, byte offset and log-prob (JSONL).")
]
TopLogprobsOption = Annotated[
    int,
    typer.Option(
        help="With --per-token: also the K most likely tokens at each position "
        "(top_logprobs: text, id and log-prob).",
        min=0,
    ),
]
LoadStateOption = Annotated[Path | None, typer.Option(help="Continue from a saved state.")]
SaveStateOption = Annotated[Path | None, typer.Option(help="Save the state after the text.")]
BlockLenOption = Annotated[int | None, typer.Option(help="Block length (speed only).")]
BatchSizeOption = Annotated[
    int | None,
    typer.Option(
        help="Files scored at once per device (continuous batching) "
        "(default: 1 on a CPU, which is busy with one; 8 on a GPU).",
        min=1,
    ),
]
WindowOption = Annotated[
    int | None,
    typer.Option(
        help="Score in windows of N tokens, each from a fresh state "
        "(default: full context from the first token).",
        min=1,
    ),
]
StrideOption = Annotated[
    int | None,
    typer.Option(
        help="With --window: windows advance by S tokens, each token scored "
        "once with its window's context (strided perplexity).",
        min=1,
    ),
]
ByPositionOption = Annotated[
    bool,
    typer.Option(
        "--by-position",
        help="NLL and bits per byte per token-position bucket "
        "(0-128, 128-256, ... doubling): the long-context curve.",
    ),
]
PlotOption = Annotated[
    Path | None,
    typer.Option(
        help="Draw bits per byte against token position (log axis) into FILE.png or "
        "FILE.svg, one line per file, dashed for the baseline (needs matplotlib: "
        "pip install 'tvq[plot]').",
    ),
]
NoAggCacheOption = Annotated[
    bool,
    typer.Option(
        "--no-agg-cache",
        help="Switch the aggregate cache off (window attention only), for ablations.",
    ),
]
BaselineOption = Annotated[
    str | None,
    typer.Option(
        help="Compare with another model (a directory, or 'builtin') in the "
        "same pass: KL divergence, delta NLL, top-1 agreement."
    ),
]
BaselineNoAggCacheOption = Annotated[
    bool,
    typer.Option(
        "--baseline-no-agg-cache",
        help="The baseline without its aggregate cache (default baseline: this model).",
    ),
]
SequenceParallelOption = Annotated[
    bool | None,
    typer.Option(
        "--sequence-parallel/--no-sequence-parallel",
        help="Spread each text over the devices, a run of blocks on each (same "
        "numbers) (default: on for one file on several GPUs).",
    ),
]


# -- the command ------------------------------------------------------------------------------


@app.command()
@handle_errors
def score(
    files: FilesArgument,
    model: ModelOption = None,
    fmt: FormatOption = None,
    per_token: PerTokenOption = None,
    top_logprobs: TopLogprobsOption = 0,
    load_state: LoadStateOption = None,
    save_state: SaveStateOption = None,
    block_len: BlockLenOption = None,
    devices: DevicesOption = None,
    batch_size: BatchSizeOption = None,
    window: WindowOption = None,
    stride: StrideOption = None,
    by_position: ByPositionOption = False,
    plot: PlotOption = None,
    no_agg_cache: NoAggCacheOption = False,
    baseline: BaselineOption = None,
    baseline_no_agg_cache: BaselineNoAggCacheOption = False,
    algorithm: AlgorithmOption = None,
    dtype: DtypeOption = None,
    sequence_parallel: SequenceParallelOption = None,
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
    options = _options(block_len=block_len, window=window, stride=stride,
                       by_position=by_position or plot is not None,  # shown or drawn
                       top_logprobs=top_logprobs, batch_size=batch_size, devices=devices,
                       sequence_parallel=sequence_parallel)  # fmt: skip
    _check_usage(files, fmt, per_token=per_token, top_logprobs=top_logprobs,
                 load_state=load_state, save_state=save_state, window=window,
                 comparing=comparing)  # fmt: skip
    _check_outputs(per_token, plot, save_state)
    join_cluster(coordinator, num_processes, process_id, distributed)
    _check_one_process(files, per_token=per_token, save_state=save_state, window=window,
                       sequence_parallel=sequence_parallel, comparing=comparing)  # fmt: skip
    models = _load_models(model, load_state=load_state, top_logprobs=top_logprobs,
                          algorithm=algorithm, dtype=dtype, no_agg_cache=no_agg_cache,
                          comparing=comparing, baseline=baseline,
                          baseline_no_agg_cache=baseline_no_agg_cache)  # fmt: skip
    writer = PerTokenWriter(per_token, models.base.tokenizer) if per_token is not None else None
    outcome = _score(models, files, options, writer)
    if outcome.scores:  # none on processes other than 0: process 0 prints them all
        rows = [score.row() for score in outcome.scores]
        print_results(rows, fmt, outcome.partial, by_position)
        if plot is not None:
            label = baseline_label(baseline, baseline_no_agg_cache)
            draw_plot(rows, plot, outcome.partial, label)
    _stop(outcome.stopped)
    if save_state is not None and outcome.context is not None:
        import tvq

        tvq.save_state(save_state, models.base, outcome.context)


# -- before any work: the options ------------------------------------------------------------


def _options(**settings):
    """The library's ScoreOptions; a value it refuses is a usage error (exit 2)."""
    import tvq
    from tvq import ScoreOptions

    try:
        return ScoreOptions(**settings)
    except tvq.InputError as e:
        raise fail(str(e), 2) from None


def _check_usage(files, fmt, *, per_token, top_logprobs, load_state, save_state, window,
                 comparing) -> None:  # fmt: skip
    """Usage errors (exit 2) in how the options go together."""
    if fmt not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", 2)
    if save_state is not None and len(files) != 1:
        raise fail("--save-state takes one input (the state after that text)", 2)
    if files.count("-") > 1:
        raise fail("'-' (stdin) can be scored once", 2)
    if top_logprobs and per_token is None:
        raise fail("--top-logprobs needs --per-token FILE (it adds to each token's row)", 2)
    if comparing and (load_state is not None or save_state is not None):
        raise fail("--baseline starts both models at the start: it takes no --load-state or "
                   "--save-state", 2)  # fmt: skip
    if window is not None and (load_state is not None or save_state is not None):
        raise fail("--window scores from fresh states: it takes no --load-state or "
                   "--save-state", 2)  # fmt: skip


def _check_outputs(per_token: Path | None, plot: Path | None, save_state: Path | None) -> None:
    """The files to write can be written (and --plot has a picture format it can draw)."""
    check_output_file(per_token, "--per-token")
    check_output_file(plot, "--plot")
    if plot is not None:
        import tvq
        from tvq.scoring.plot import check_plot

        try:
            check_plot(plot)
        except tvq.TvqError as e:
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
    run: Any  # with the speed settings and the aggregate cache option
    baseline: Any  # None unless comparing
    start: Any  # the --load-state context, or None


def _load_models(model, *, load_state, top_logprobs, algorithm, dtype, no_agg_cache,
                 comparing, baseline, baseline_no_agg_cache) -> _Models:  # fmt: skip
    """The model, the start state and the baseline."""
    import tvq
    from tvq import require_tokenizer

    base = tvq.load(model)
    require_tokenizer(base)  # before the state file, which names its tokenizer
    if top_logprobs > base.config.n_vocab:
        raise fail(f"--top-logprobs must be at most the vocabulary size "
                   f"{base.config.n_vocab}, got {top_logprobs}", 2)  # fmt: skip
    start = tvq.load_state(load_state, base) if load_state is not None else None
    loaded = run_settings(base, algorithm, dtype)
    if no_agg_cache:  # same parameters, the window alone
        loaded = loaded.with_agg_cache(False)
    other = _baseline(baseline, loaded, baseline_no_agg_cache) if comparing else None
    return _Models(base, loaded, other, start)


def _baseline(name: str | None, model, no_agg_cache: bool):
    """The baseline model: a directory, 'builtin', or (None) this model itself (checked
    against the model's tokenizer by the library before any work)."""
    import tvq

    if name is None:
        other = model
    elif name == "builtin" and not Path(name).exists():
        other = tvq.load()
    else:
        other = tvq.load(name)
    return other.with_agg_cache(False) if no_agg_cache else other


# -- scoring --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Outcome:
    scores: list = dataclasses.field(default_factory=list)  # each file's, then TOTAL
    context: Any = None  # the state after the last text (--save-state)
    stopped: tuple[str, int] | None = None  # (message, exit code) when it stopped part-way

    @property
    def partial(self) -> bool:
        return self.stopped is not None


def _score(models: _Models, files: list[str], options, writer) -> _Outcome:
    """tvq.scoring.job.score_files with a progress line on stderr. Ctrl-C, a failed read
    or a failed --per-token write stops it with the results so far, marked partial.
    Closes --per-token. No scores on processes other than 0."""
    from tvq import score_files

    inputs = [("<stdin>", sys.stdin.buffer) if name == "-" else name for name in files]
    progress = ProgressLine()
    done = _Outcome()
    try:
        for score, context in score_files(
            models.run, inputs, options, baseline=models.baseline, start=models.start,
            on_tokens=writer.write if writer is not None else None,
            on_progress=progress.update,
        ):  # fmt: skip
            done.scores.append(score)
            done.context = context if context is not None else done.context
            if score.invalid_utf8:
                warn_not_utf8(score.file)
    except KeyboardInterrupt:
        done.stopped = (f"interrupted: {PARTIAL}", 130)
    except OSError as e:  # reading an input or writing --per-token failed part-way
        done.stopped = (f"{e.filename or 'input'}: {e.strerror or e}; {PARTIAL}", 1)
    finally:
        progress.close()
        if writer is not None and not writer.close():
            done.stopped = done.stopped or (f"{writer.path} cannot be written", 1)
    return done


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
