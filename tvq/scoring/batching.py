"""Scoring many texts at once: continuous batching over the devices (docs/DESIGN.md
section 8).

R rows (B per device of a `data` mesh) each score one text from its first token to its
last; a row whose text ends takes the next one at the following step, its state reset
to the start state inside the compiled step. Every step feeds the same shape, [R, S]
tokens, so one program is compiled; a row that runs out of text mid-step is padded and
its padding does not count (attention is causal, so the padding cannot change the
scores of the tokens before it). The fixed-size state is what makes the switch cheap:
nothing grows with a text's length, and memory stays flat however long the texts are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from tvq.config import ModelConfig
from tvq.distributed.devices import data_mesh, replicated, split_rows
from tvq.files import warm
from tvq.nn.state import ModelState
from tvq.runtime.context import Context, require_tokenizer
from tvq.runtime.forward import forward
from tvq.runtime.model import Model, check_block_len
from tvq.scoring.stats import FileScore
from tvq.scoring.stream import WordCounter
from tvq.text.tokenizer import encode_stream

STEP_BLOCKS = 4  # tokens per row per step: this many blocks, at least MIN_STEP tokens
MIN_STEP = 256


def step_len(block_len: int) -> int:
    """Tokens per row per step: short enough that padding at a text's end stays small."""
    block_len = check_block_len(block_len)
    return block_len * max(STEP_BLOCKS, -(-MIN_STEP // block_len))


# Its rows are split over the devices, and in a cluster over processes: not kept on disk.
@warm.entry(static_argnames=("config", "block_len", "algorithm"), donate_argnums=(3,),
            store=False)  # fmt: skip
def _score_step(config: ModelConfig, block_len: int, params: Any, state: ModelState,
                start: ModelState, reset: jax.Array, inputs: jax.Array, targets: jax.Array,
                valid: jax.Array, algorithm: str = "serial",
                ) -> tuple[jax.Array, ModelState]:  # fmt: skip
    """Rows flagged `reset` restart from `start`; → (NLL of each token [R, S], 0 where not
    valid, and the state)."""

    def pick(now: jax.Array, fresh: jax.Array) -> jax.Array:
        flags = reset.reshape(reset.shape + (1,) * (now.ndim - 1))
        return jnp.where(flags, fresh, now)

    state = jax.tree_util.tree_map(pick, state, start)
    log_probs, state = forward(config, params, inputs, state, block_len, targets,
                               algorithm=algorithm)  # fmt: skip
    return -jnp.where(valid, log_probs, 0.0), state


@dataclasses.dataclass
class _Row:
    """One text being scored in one row."""

    index: int  # position of the text in the input order
    pieces: Iterator[tuple[list[int], int, bool]]
    score: FileScore
    pending: list[int] = dataclasses.field(default_factory=list)
    exhausted: bool = False

    def take(self, count: int) -> list[int]:
        """Up to `count` next tokens, reading the stream as needed."""
        while len(self.pending) < count and not self.exhausted:
            self._read()
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken

    @property
    def finished(self) -> bool:
        """No token left (reads ahead until one is pending or the stream ends)."""
        while not self.pending and not self.exhausted:
            self._read()
        return self.exhausted and not self.pending

    def _read(self) -> None:
        try:
            ids, n_bytes, invalid = next(self.pieces)
        except StopIteration:
            self.exhausted = True
            return
        except OSError as e:  # a failed read names its text
            if e.filename is None:
                e.filename = self.score.file
            raise
        self.pending.extend(ids)
        self.score.bytes += n_bytes
        self.score.invalid_utf8 |= invalid


class BatchScorer:
    """Scores `texts` ((name, binary stream) pairs) on `rows_per_device` rows (default:
    1 on a CPU, 8 on an accelerator) of each of `devices` local devices; `results` are in
    the input order, exact to float rounding against scoring each text alone
    (tvq.scoring.stream.score_stream)."""

    def __init__(
        self,
        model: Model,
        texts: Sequence[tuple[str, BinaryIO]],
        *,
        rows_per_device: int | None = None,
        devices: int | None = None,
        block_len: int | None = None,
        start: Context | None = None,
        by_position: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = require_tokenizer(model)
        self.by_position = by_position  # FileScore.by_position for every text
        self.token_bytes = (
            np.array([len(self.tokenizer.token_bytes(i)) for i in range(model.config.n_vocab)])
            if by_position else None
        )  # fmt: skip
        self.texts = list(texts)
        self.mesh = data_mesh(devices, local=True)
        if rows_per_device is None:  # a CPU is as busy with one row as with eight
            rows_per_device = 1 if jax.default_backend() == "cpu" else 8
        per_device = -(-len(self.texts) // self.mesh.size)  # no more rows than texts need
        self.rows = self.mesh.size * max(1, min(rows_per_device, per_device))
        self.block_len = model.block_len if block_len is None else check_block_len(block_len)
        self.step_len = step_len(self.block_len)
        self.start = start or Context.start(model, 1)
        self.results: list[FileScore | None] = [None] * len(self.texts)
        self.active: list[_Row | None] = [None] * self.rows
        self.finished_bytes = 0  # bytes of the texts already finished (progress)

    def begun(self) -> list[tuple[int, FileScore]]:
        """(input index, score) of every text finished or begun, in the input order; the
        scores of texts still running are partial (after a stop)."""
        running = {row.index: row.score for row in self.active if row is not None}
        return [(i, r or running[i]) for i, r in enumerate(self.results) if r or i in running]

    def run(self, on_step: Callable[[int, Callable[[], list]], None] | None = None
            ) -> list[FileScore]:  # fmt: skip
        """Scores everything; on_step(bytes read so far, begun) after each step
        (progress), begun() giving (index, score) of the texts finished or begun."""
        rows, length = self.rows, self.step_len
        params = replicated(self.mesh, self.model.params)
        start_host = jax.tree_util.tree_map(
            lambda x: np.repeat(np.asarray(x), rows, axis=0), self.start.state
        )
        start_rows = split_rows(self.mesh, start_host)
        state = split_rows(self.mesh, start_host)  # its own buffers: the step donates them
        start_token = int(self.start.last_token[0])
        last = np.full([rows], start_token, np.int32)
        queue = iter(range(len(self.texts)))
        while True:
            reset = np.zeros([rows], bool)
            for r in range(rows):  # a row whose text ended takes the next text
                while self.active[r] is None or self.active[r].finished:
                    if self.active[r] is not None:
                        self._finish(self.active[r])
                        self.active[r] = None
                    index = next(queue, None)
                    if index is None:
                        break
                    name, stream = self.texts[index]
                    score = FileScore(name, by_position=[] if self.by_position else None)
                    pieces = encode_stream(self.tokenizer, WordCounter(stream, score))
                    self.active[r] = _Row(index, pieces, score)
                    reset[r], last[r] = True, start_token
            if all(row is None for row in self.active):
                break
            targets = np.zeros([rows, length], np.int32)
            valid = np.zeros([rows, length], bool)
            counts = np.zeros([rows], np.int64)
            for r, row in enumerate(self.active):
                if row is None:
                    continue
                ids = row.take(length)
                counts[r] = len(ids)
                targets[r, : len(ids)] = ids
                valid[r, : len(ids)] = True
            inputs = np.concatenate([last[:, None], targets[:, :-1]], axis=1)
            placed = split_rows(self.mesh, (jnp.asarray(reset), inputs, targets, valid))
            nll, state = _score_step(self.model.config, self.block_len, params, state, start_rows,
                                     *placed, algorithm=self.model.algorithm)  # fmt: skip
            nll = np.asarray(nll, np.float64)
            for r, row in enumerate(self.active):
                if row is not None and counts[r]:
                    if self.by_position:
                        taken = targets[r, : counts[r]]
                        row.score.add_positions(row.score.tokens, nll[r, : counts[r]],
                                                self.token_bytes[taken])  # fmt: skip
                    row.score.tokens += int(counts[r])
                    row.score.nll_sum += float(nll[r, : counts[r]].sum())
                    row.score.add_nll(nll[r, : counts[r]])
                    last[r] = targets[r, counts[r] - 1]
            if on_step is not None:
                running = sum(row.score.bytes for row in self.active if row is not None)
                on_step(self.finished_bytes + running, self.begun)
        return [r for r in self.results if r is not None]

    def _finish(self, row: _Row) -> None:
        self.results[row.index] = row.score
        self.finished_bytes += row.score.bytes
