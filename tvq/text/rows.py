"""The host side of sampled text (docs/DESIGN.md section 7): each row's ids decoded as
they arrive (never half a character), stop strings applied (text that may begin one is
held back until it cannot), finished rows marked, and final text released as `Piece`s,
each with the tokens that came with it, for the caller to take (`TextRows.released`).
The compiled loop hands it one token per row at a time (tvq/decoding.py)."""

from __future__ import annotations

import dataclasses
import time

from tvq.text.tokenizer import StreamDecoder


@dataclasses.dataclass
class Sample:
    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    log_probs: list[float] = dataclasses.field(default_factory=list)
    # per token, with generate(logprobs=k): the k most likely (id, log-prob), likeliest first
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str = "length"  # "length", "eos", "stop" or "cancelled"
    done: bool = False


@dataclasses.dataclass(frozen=True)
class Piece:
    """A piece of a sample's final text (never half a character, never the start of a
    stop string that may still complete) with the tokens that came with it: the
    sample's ids[start:start + len(ids)], their log-probs and, when asked for, their
    most likely alternatives. A piece may have no text (tokens that end a row without
    any, e.g. a stop string's) or no tokens (text held back until the row ended). The
    pieces of a sample join to the whole sample."""

    sample: int  # which sample of its prompt
    text: str
    start: int  # the index of its first token in the sample
    ids: list[int]
    log_probs: list[float]
    top_logprobs: list[list[tuple[int, float]]]  # per token, likeliest first; [] if not asked
    prompt: int = 0  # which prompt of a batch it belongs to


class TextRows:
    """Host side of the loop: decodes each row, applies stop strings, and releases each
    row's final text as Pieces (`released`, taken with `drain`)."""

    def __init__(self, tokenizer, stops, ignore_eos, logprobs):
        """stops: each row's stop strings (one list per row); ignore_eos: per row, go on
        past an end of document; logprobs: per row, how many alternatives to keep."""
        n = len(stops)
        self.samples = [Sample() for _ in range(n)]
        self.decoders = [StreamDecoder(tokenizer) for _ in range(n)]
        self.pending = [""] * n  # decoded text not yet released (may begin a stop string)
        self.stops = [[s for s in row if s] for row in stops]
        self.eos_id = tokenizer.eos_id
        self.ignore_eos, self.logprobs = list(ignore_eos), list(logprobs)
        self.attached = [0] * n  # per row: tokens already released with a piece
        self.released: list[Piece] = []  # pieces not yet taken by the caller
        self.first_token_at: float | None = None

    def drain(self) -> list[Piece]:
        """The pieces released since the last drain, oldest first."""
        pieces, self.released = self.released, []
        return pieces

    def take(self, tokens, log_probs, top_log_probs, top_ids) -> bool:
        """One sampled token per row (and its row's top-k [B, k]); True once every row
        has finished."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for row, sample in enumerate(self.samples):
            if sample.done:
                continue
            token = int(tokens[row])
            sample.ids.append(token)
            sample.log_probs.append(float(log_probs[row]))
            if self.logprobs[row]:
                k = self.logprobs[row]
                pairs = zip(top_ids[row, :k].tolist(), top_log_probs[row, :k].tolist(),
                            strict=True)  # fmt: skip
                sample.top_logprobs.append(list(pairs))
            if token == self.eos_id:
                if not self.ignore_eos[row]:
                    self._finish(row, "eos")
                continue  # an end of document has no text
            self.pending[row] += self.decoders[row].push(token)
            self._release(row)
        return all(s.done for s in self.samples)

    def _release(self, row: int) -> None:
        text = self.pending[row]
        for stop in self.stops[row]:
            at = text.find(stop)
            if at >= 0:
                self.pending[row] = text[:at]
                self._finish(row, "stop", flush=False)
                return
        hold = max((k for s in self.stops[row] for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self._out(row, text[: len(text) - hold])
        self.pending[row] = text[len(text) - hold :]

    def _finish(self, row: int, reason: str, flush: bool = True) -> None:
        tail = self.pending[row] + (self.decoders[row].flush() if flush else "")
        self._out(row, tail)
        self.pending[row] = ""
        self.samples[row].finish_reason = reason
        self.samples[row].done = True

    def cancel(self, mask) -> None:
        """Ends the rows where mask [B] is true (their clients went away)."""
        for row, sample in enumerate(self.samples):
            if mask[row] and not sample.done:
                self._finish(row, "cancelled")

    def finish_at(self, row: int) -> None:
        """Ends the row, if it is running, as "length" (its max_tokens, or the end)."""
        if not self.samples[row].done:
            self.pending[row] += self.decoders[row].flush()
            self._finish(row, "length", flush=False)

    @property
    def all_done(self) -> bool:
        return all(s.done for s in self.samples)

    def finish_all(self) -> None:
        for row in range(len(self.samples)):
            self.finish_at(row)

    def _out(self, row: int, text: str) -> None:
        sample = self.samples[row]
        sample.text += text
        start, end = self.attached[row], len(sample.ids)
        if text or start < end:
            self.attached[row] = end
            tops = sample.top_logprobs[start:end] if self.logprobs[row] else []
            self.released.append(Piece(row, text, start, sample.ids[start:end],
                                       sample.log_probs[start:end], tops))  # fmt: skip
