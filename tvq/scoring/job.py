"""The job behind `tvq score` (docs/DESIGN.md section 8): files in, a score per file and
their total out, whoever asks (the CLI, a notebook, a script).

`score_files` decides how. Several files are scored together (continuous batching over
the devices, tvq/scoring/batching.py) and, in a cluster, shared out among the processes
(tvq/distributed), unless something needs them one after another (`score_stream`):
per-token results, a window protocol, a baseline, or one text spread over the devices.
The numbers are the same either way, to float rounding. It never prints: progress goes
to a callback, and a run stopped part-way yields what it has before it raises.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from tvq.distributed import cluster
from tvq.errors import InputError, is_int
from tvq.runtime.context import Context, require_tokenizer
from tvq.runtime.model import Model, check_block_len, check_top_k
from tvq.scoring.batching import BatchScorer
from tvq.scoring.compare import check_baseline
from tvq.scoring.stats import FileScore
from tvq.scoring.stream import check_protocol, score_stream

# A path (opened and closed here), the bytes of a text, a binary stream (named by its
# `name`), or a (name, binary stream) pair.
Input = str | os.PathLike | bytes | BinaryIO | tuple[str, BinaryIO]
# score_files' yields: a file's score and the state after it (None when scored together)
Scored = tuple[FileScore, Context | None]


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How `score_files` scores, checked once (InputError).

    block_len: block length (speed only; None: the model's). window, stride: the
    protocol (tvq.scoring.stream.score_stream; None: full context). by_position: the
    long-context curve in every score. top_logprobs: the K most likely tokens in each
    on_tokens call. batch_size: files scored at once per device (None: 1 on a CPU, 8 on
    an accelerator). devices: local devices to use (None: all). sequence_parallel: each
    text spread over the devices (None: on for one file on several accelerators)."""

    block_len: int | None = None
    window: int | None = None
    stride: int | None = None
    by_position: bool = False
    top_logprobs: int = 0
    batch_size: int | None = None
    devices: int | None = None
    sequence_parallel: bool | None = None

    def __post_init__(self) -> None:
        if self.block_len is not None:
            check_block_len(self.block_len)
        check_protocol(self.window, self.stride)
        if not is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise InputError(f"top_logprobs must be >= 0, got {self.top_logprobs!r}")
        for name in ("batch_size", "devices"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise InputError(f"{name} must be >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ScoreProgress:
    """How far a run is: `bytes_done` of `bytes_total` (0: unknown, e.g. a pipe), and
    `scores()`, the scores of the files finished or begun (pooling them costs time in
    the number of files: ask only when it is shown)."""

    bytes_done: int
    bytes_total: int
    scores: Callable[[], list[FileScore]]


def score_files(
    model: Model,
    inputs: Sequence[Input],
    options: ScoreOptions | None = None,
    *,
    baseline: Model | None = None,
    start: Context | None = None,
    on_tokens: Callable[[str, list[int], Any, int, Any], None] | None = None,
    on_progress: Callable[[ScoreProgress], None] | None = None,
) -> Iterator[Scored]:
    """Scores texts → an iterator of (FileScore, context): each text's score in the input
    order with the state after it (None when the texts were scored together), then
    (TOTAL, None), `FileScore.total` of them all. Each text starts from `start` (None:
    the start state); `FileScore.row()` is a row of `tvq score`.

    baseline: a second model (same tokenizer) compared token by token in the same pass.
    on_tokens(name, ids, log_probs, byte_offset, top): per-token results (see
    score_stream). on_progress(ScoreProgress) after each scored piece or step.

    Arguments are checked here, before any work; inputs are opened (InputError for a
    path that cannot be read) when the iteration starts, and closed when it ends or is
    closed. A run stopped part-way by Ctrl-C (KeyboardInterrupt) or a failed read or
    on_tokens write (OSError, its filename set) yields the scores so far, the running
    files' partial, and their TOTAL, then raises that exception. In a cluster
    (tvq.distributed.cluster) each process scores every P-th text and process 0 yields
    the scores of all; the others yield nothing.
    """
    options = options or ScoreOptions()
    inputs = list(inputs)
    _check(model, inputs, options, baseline, start, on_tokens)
    model, spread = _spread(model, options, len(inputs))
    if _batched(len(inputs), options, spread=spread, baseline=baseline, on_tokens=on_tokens):
        scoring = functools.partial(_together, model, options, start)
    else:
        scoring = functools.partial(_one_by_one, model, options, baseline=baseline, start=start,
                                    on_tokens=on_tokens)  # fmt: skip
    return _run(inputs, scoring, _Reporter(on_progress))


# -- before any work -------------------------------------------------------------------------


def _check(model: Model, inputs: list, options: ScoreOptions, baseline: Model | None,
           start: Context | None, on_tokens: Callable | None) -> None:  # fmt: skip
    """The arguments against each other and the model (InputError)."""
    require_tokenizer(model)
    check_top_k(options.top_logprobs, model.config.n_vocab, "top_logprobs")
    if baseline is not None:
        check_baseline(model, baseline)
        if start is not None:
            raise InputError("a comparison with a baseline starts both models from the start")
    if options.window is not None and start is not None:
        raise InputError("a window starts from a fresh state: it cannot continue a state")
    if cluster.active() and (
        on_tokens is not None or options.window is not None or baseline is not None
        or options.sequence_parallel or not all(isinstance(i, (str, os.PathLike)) for i in inputs)
    ):  # fmt: skip
        raise InputError("in a cluster the files are shared out among the processes: "
                         "per-token results, windows, a baseline, sequence parallelism "
                         "and streams score in one process")  # fmt: skip


def _spread(model: Model, options: ScoreOptions, count: int) -> tuple[Model, bool]:
    """The model with each text spread over the devices where asked, or by default where
    it pays (one text in one process, several accelerators); → (model, whether spread)."""
    import jax

    local = len(jax.local_devices())
    wanted = options.sequence_parallel
    if wanted is None:
        accelerators = 0 if jax.default_backend() == "cpu" else local
        if options.devices is not None:
            accelerators = min(accelerators, options.devices)
        wanted = count == 1 and accelerators > 1 and not cluster.active()
    if not wanted:
        return model, False
    devices = local if options.devices is None else options.devices
    return dataclasses.replace(model, sequence_devices=devices), True  # checks the count


def _batched(count: int, options: ScoreOptions, *, spread: bool, baseline: Model | None,
             on_tokens: Callable | None) -> bool:  # fmt: skip
    """Whether the texts are scored together: always in a cluster; else several texts,
    unless per-token results, a window protocol, a baseline or one text spread over the
    devices needs them one after another."""
    return cluster.active() or (
        count > 1 and on_tokens is None and options.window is None and baseline is None
        and not spread
    )  # fmt: skip


def _open(inputs: list) -> tuple[list[tuple[str, BinaryIO]], list[BinaryIO], int]:
    """(name, binary stream) of every input, the streams opened here, and the bytes of
    them all where known; InputError for a path that cannot be read."""
    texts, opened = [], []
    try:
        for item in inputs:
            if isinstance(item, (str, os.PathLike)):
                opened.append(_open_path(item))
                texts.append((os.fspath(item), opened[-1]))
            elif isinstance(item, (bytes, bytearray)):
                texts.append(("<bytes>", io.BytesIO(item)))
            elif isinstance(item, tuple):
                texts.append(item)
            else:
                texts.append((str(getattr(item, "name", "<stream>")), item))
    except BaseException:
        _close(opened)
        raise
    return texts, opened, sum(_size(stream) for _, stream in texts)


def _open_path(path: str | os.PathLike) -> BinaryIO:
    name = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{name} is a directory")
    try:
        return open(path, "rb")  # noqa: SIM115 (closed when the run ends)
    except FileNotFoundError:
        raise InputError(f"{name} does not exist") from None
    except OSError as e:
        raise InputError(f"{name} cannot be read: {e.strerror}") from None


def _size(stream: BinaryIO) -> int:
    """Bytes of a regular file or an in-memory text; 0 where unknown (a pipe)."""
    if isinstance(stream, io.BytesIO):
        return stream.getbuffer().nbytes
    try:
        info = os.fstat(stream.fileno())
    except (OSError, AttributeError, ValueError):
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _close(streams: list[BinaryIO]) -> None:
    for stream in streams:
        stream.close()


# -- the run ---------------------------------------------------------------------------------


class _Reporter:
    """Calls on_progress, when there is one, with bytes_total filled in."""

    def __init__(self, on_progress: Callable[[ScoreProgress], None] | None) -> None:
        self.on_progress, self.total = on_progress, 0

    def __call__(self, done: int, scores: Callable[[], list[FileScore]]) -> None:
        if self.on_progress is not None:
            self.on_progress(ScoreProgress(done, self.total, scores))


def _run(inputs: list, scoring: Callable, report: _Reporter) -> Iterator[Scored]:
    """Opens the inputs, scores them with `scoring`, and closes what it opened."""
    texts, opened, report.total = _open(inputs)
    try:
        yield from scoring(texts, report)
    finally:
        _close(opened)


def _one_by_one(model: Model, options: ScoreOptions, texts: list[tuple[str, BinaryIO]],
                report: _Reporter, *, baseline: Model | None, start: Context | None,
                on_tokens: Callable | None) -> Iterator[Scored]:  # fmt: skip
    """Each text in turn from `start`, yielded as it ends."""
    done: list[FileScore] = []
    current: list[FileScore] = []  # the text being scored, once its first piece is

    def on_piece(score: FileScore) -> None:
        current[:] = [score]
        report(sum(s.bytes for s in done) + score.bytes, lambda: done + current)

    stopped, name = None, ""
    try:
        for name, stream in texts:
            current.clear()
            score, context = score_stream(
                model, stream, name, block_len=options.block_len, context=start,
                on_piece=on_piece, on_tokens=_for_text(on_tokens, name), window=options.window,
                stride=options.stride, by_position=options.by_position, baseline=baseline,
                top_logprobs=options.top_logprobs,
            )  # fmt: skip
            done.append(score)
            current.clear()
            yield score, context
    except (KeyboardInterrupt, OSError) as e:
        stopped = _named(e, name)
    for score in current:  # the partial text
        done.append(score)
        yield score, None
    yield from _finish(done, stopped)


def _together(model: Model, options: ScoreOptions, start: Context | None,
              texts: list[tuple[str, BinaryIO]], report: _Reporter,
              ) -> Iterator[Scored]:  # fmt: skip
    """Continuous batching over the devices, and over the processes of a cluster (each
    scores every P-th text); yielded in the input order when all have ended."""
    import jax

    share = list(range(jax.process_index(), len(texts), jax.process_count()))
    if jax.process_count() > 1:  # this process's part of the bytes
        report.total = sum(_size(texts[i][1]) for i in share)
    scorer = BatchScorer(model, [texts[i] for i in share], rows_per_device=options.batch_size,
                         devices=options.devices, block_len=options.block_len, start=start,
                         by_position=options.by_position)  # fmt: skip
    stopped = None
    try:
        scorer.run(on_step=lambda done, begun: report(done, lambda: [s for _, s in begun()]))
    except (KeyboardInterrupt, OSError) as e:
        stopped = e
    gathered = _gather([(share[k], score) for k, score in scorer.begun()], stopped)
    if gathered is None:
        return  # process 0 yields every process's scores
    scores, stopped = gathered
    for score in scores:
        yield score, None
    yield from _finish(scores, stopped)


def _finish(scores: list[FileScore], stopped: BaseException | None) -> Iterator[Scored]:
    """The TOTAL; then what stopped the run part-way, if anything did."""
    yield FileScore.total(scores), None
    if stopped is not None:
        raise stopped


def _for_text(on_tokens: Callable | None, name: str) -> Callable | None:
    """score_stream's on_tokens(ids, log_probs, offset, top) for the text `name`."""
    return None if on_tokens is None else functools.partial(on_tokens, name)


def _named(error: BaseException, name: str) -> BaseException:
    """An OSError without a file name gets the text's (a stream read by name)."""
    if isinstance(error, OSError) and error.filename is None:
        error.filename = name
    return error


# -- a cluster's scores, on process 0 ----------------------------------------------------------


def _gather(begun: list[tuple[int, FileScore]], stopped: BaseException | None
            ) -> tuple[list[FileScore], BaseException | None] | None:  # fmt: skip
    """Every process's (input index, score) pairs, merged in the input order on process
    0, with this process's stop or else the first peer's; None on the others."""
    mine = [dict(dataclasses.asdict(score), index=index) for index, score in begun]
    shared = cluster.gather("score", {"scores": mine, "stopped": _describe(stopped)})
    if shared is None:
        return None
    merged = sorted((s for part in shared for s in part["scores"]), key=lambda s: s["index"])
    scores = [FileScore(**{k: v for k, v in s.items() if k != "index"}) for s in merged]
    stops = [part["stopped"] for part in shared if part["stopped"]]
    return scores, stopped or (_rebuild(stops[0]) if stops else None)


def _describe(error: BaseException | None) -> dict | None:
    """A stop as JSON, for process 0."""
    if error is None:
        return None
    if isinstance(error, OSError):
        return {"errno": error.errno, "strerror": error.strerror, "filename": error.filename,
                "message": str(error)}  # fmt: skip
    return {"interrupted": True}


def _rebuild(stop: dict) -> BaseException:
    """A peer's stop, as the exception that stopped it."""
    if stop.get("interrupted"):
        return KeyboardInterrupt()
    if stop.get("errno") is not None:
        return OSError(stop["errno"], stop["strerror"], stop["filename"])
    return OSError(stop["message"])
