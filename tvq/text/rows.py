"""The host side of sampled text (docs/DESIGN.md section 7): each row's ids decoded as
they arrive (never half a character), stop strings applied (text that may begin one is
held back until it cannot; each character is read once, `StopStrings`), finished rows
marked, and final text released as `Piece`s, each with the tokens that came with it,
for the caller to take (`TextRows.released`). The compiled loop hands it one token per
row at a time (tvq/decoding.py)."""

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
        tables: dict[tuple, tuple] = {}  # rows with the same stop strings share their tables
        self.stops = [StopStrings([s for s in row if s], tables) for row in stops]
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
            new = self.decoders[row].push(token)
            self.pending[row] += new
            self._release(row, new)
        return all(s.done for s in self.samples)

    def _release(self, row: int, new: str) -> None:
        """Releases the row's pending text, `new` at its end, up to what may begin a
        stop string; or ends the row before the stop string `new` completes."""
        text, stops = self.pending[row], self.stops[row]
        if not stops.stops:  # nothing to hold back
            self._out(row, text)
            self.pending[row] = ""
            return
        end = stops.read(new)
        if end is not None:  # the stop string began `end` characters before the text's end
            self.pending[row] = text[: len(text) - end]
            self._finish(row, "stop", flush=False)
            return
        self._out(row, text[: len(text) - stops.hold])
        self.pending[row] = text[len(text) - stops.hold :]

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

    def complete(self, row: int) -> None:
        """Ends the row, if it is running, as "stop": its constraint's grammar is
        complete (tvq.text.constraints)."""
        if not self.samples[row].done:
            self._finish(row, "stop")

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


class StopStrings:
    """A row's stop strings, matched as its text arrives a character at a time
    (Knuth-Morris-Pratt): for each, the longest of its prefixes that the text ends with,
    so every character is read a bounded number of times, however long the text held
    back. The text ends before the first stop string to be completed (the longest, if
    several end at one character)."""

    def __init__(self, stops: list[str], tables: dict[tuple, tuple]) -> None:
        key = tuple(stops)
        if key not in tables:
            tables[key] = tuple(_failure(stop) for stop in stops)
        self.stops, self.failure = stops, tables[key]
        self.matched = [0] * len(stops)  # per stop string: its prefix the text ends with

    @property
    def hold(self) -> int:
        """How many characters at the text's end may begin a stop string."""
        return max(self.matched, default=0)

    def read(self, text: str) -> int | None:
        """Reads more text; None, or, once a stop string is completed, how many
        characters before the end of the text read so far it began."""
        for at, char in enumerate(text):
            done = 0
            for i, stop in enumerate(self.stops):
                k = self.matched[i]
                while k and stop[k] != char:
                    k = self.failure[i][k - 1]
                k += stop[k] == char
                self.matched[i] = k
                if k == len(stop):
                    done = max(done, k)
            if done:
                return done + len(text) - 1 - at
        return None


def _failure(stop: str) -> list[int]:
    """Knuth-Morris-Pratt's table: per prefix stop[:k + 1], its longest proper prefix that
    is also its suffix."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        k += stop[i] == stop[k]
        table[i] = k
    return table
