"""The state cache (docs/DESIGN.md section 10): the context after a prefix of token ids,
kept so that no text is read twice.

The state after any prefix has a fixed size (`Model.state_bytes_per_sequence`), so it
is cheap to keep the state of any prompt. An entry is the `Context` after a text read
from the start of a document, keyed by a hash chain over its token ids and everything
that changes the numbers (`numbers_key`: the model's and the tokenizer's fingerprints,
the compute dtype, the algorithm, the aggregate cache on or off). `longest` finds the
longest cached prefix of a prompt at token granularity: the hashes of the prefixes of
every cached length are taken in one pass over the prompt's ids. By block-length
invariance (section 6) reading the rest from there gives the numbers of reading the
whole prompt.

Two tiers, each bounded by bytes, least recently used first out: memory (the contexts
on the device) and, optionally, a folder of state files (tvq/runtime/statefile.py:
written atomically, checked by a checksum and the model's fingerprint on reading; an
entry that does not read back is removed with a warning and counts as a miss, never as
a wrong answer). Safe to share between threads.

Named entries are pinned (`pin`): the server's sessions (tvq/serving/sessions.py) are
kept here by name, counted in the same memory bound but never evicted for a prefix;
their store decides which of them stay.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tvq.errors import StateError
from tvq.runtime.context import Context, score_ids
from tvq.runtime.model import Model
from tvq.runtime.statefile import load_state, save_state

DEFAULT_MEMORY_BYTES = 1 << 30  # about 150 states of the built-in model
DEFAULT_DISK_BYTES = 2 << 30
SUFFIX = ".state"


def numbers_key(model: Model) -> str:
    """What makes two runs give the same numbers for the same ids: the model (its config,
    dtype and aggregate cache included, and every parameter), the tokenizer and the
    algorithm."""
    parts = {
        "model": model.fingerprint,
        "tokenizer": model.tokenizer.fingerprint if model.tokenizer is not None else None,
        "dtype": model.config.dtype,
        "agg_cache": model.config.agg_cache,
        "algorithm": model.algorithm,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def prefix_digests(key: str, ids: np.ndarray, lengths: Sequence[int]) -> dict[int, str]:
    """The digest of ids[:n] under `key`, for each n in lengths (≤ len(ids)): one pass
    over the ids, the chain's state copied at each length."""
    chain = hashlib.sha256(key.encode())
    digests, at = {}, 0
    for n in sorted(set(lengths)):
        chain.update(np.ascontiguousarray(ids[at:n], "<i4").tobytes())
        digests[n], at = chain.copy().hexdigest()[:40], n
    return digests


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """The log-prob of each token of a prefix given the ones before it [T], and the k
    most likely tokens at each position: log-probs and ids [T, k] (what `echo` with
    `logprobs` answers; tvq.runtime.context.score_ids's numbers)."""

    log_probs: np.ndarray
    top_log_probs: np.ndarray
    top_ids: np.ndarray

    @property
    def k(self) -> int:
        return self.top_ids.shape[1]

    @property
    def nbytes(self) -> int:
        return self.log_probs.nbytes + self.top_log_probs.nbytes + self.top_ids.nbytes

    def joined(self, more: PromptScores) -> PromptScores:
        k = min(self.k, more.k)
        return PromptScores(np.concatenate([self.log_probs, more.log_probs]),
                            np.concatenate([self.top_log_probs[:, :k], more.top_log_probs[:, :k]]),
                            np.concatenate([self.top_ids[:, :k], more.top_ids[:, :k]]))  # fmt: skip


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0  # tokens not read again, in all
    dropped: int = 0  # disk entries that did not read back


class StateCache:
    """Contexts after prefixes of token ids, in memory (`memory_bytes`) and optionally in
    `folder` (`disk_bytes`); either bound 0 turns that tier off. completions: generation
    keeps the context after a completion too (a chat client sends the answer back with
    its next turn), not only after prompts; every_chunk: after each chunk along a long
    prompt too (a later prompt that shares only its start), not only at its end."""

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY_BYTES, folder: Path | None = None,
                 disk_bytes: int = DEFAULT_DISK_BYTES, *, completions: bool = True,
                 every_chunk: bool = True) -> None:  # fmt: skip
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self.completions, self.every_chunk = completions, every_chunk
        self.folder = Path(folder) if folder is not None else None
        # (numbers key, length, digest) → (context, its bytes, the prefix's scores or
        # None), least recently used first
        self.entries: collections.OrderedDict[tuple, tuple[Context, int, PromptScores | None]] = (
            collections.OrderedDict()
        )
        self.entry_bytes = 0
        self.pins: dict[str, tuple[Context, int]] = {}  # name → (context, its bytes)
        self.stats = CacheStats()
        self.lock = threading.RLock()

    # -- reading ----------------------------------------------------------------------

    def longest(self, model: Model, ids: Sequence[int] | np.ndarray) -> tuple[int, Context | None]:
        """The longest cached prefix of ids → (its length, the context after it), or
        (0, None)."""
        n, context, _ = self.longest_scored(model, ids, None)
        return n, context

    def longest_scored(self, model: Model, ids: Sequence[int] | np.ndarray, top_k: int | None
                       ) -> tuple[int, Context | None, PromptScores | None]:  # fmt: skip
        """longest, among the entries that hold the prefix's scores with at least top_k
        alternatives (None: any entry) → (length, context, scores)."""
        ids = np.asarray(ids, np.int32)
        key = numbers_key(model)
        with self.lock:
            lengths = self._lengths(key, len(ids), top_k)
            digests = prefix_digests(key, ids, lengths)
            for n in sorted(lengths, reverse=True):
                held = self._get(model, (key, n, digests[n]))
                if held is not None and (top_k is None or held[2] is not None):
                    self.stats.hits += 1
                    self.stats.cached_tokens += n
                    return n, held[0], held[2]
            self.stats.misses += 1
            return 0, None, None

    def _lengths(self, key: str, limit: int, top_k: int | None = None) -> set[int]:
        """The cached prefix lengths (1 … limit) under key, in either tier (top_k: only
        entries in memory whose scores have as many alternatives)."""
        lengths = {n for (k, n, _), (_, _, scores) in self.entries.items()
                   if k == key and 0 < n <= limit
                   and (top_k is None or scores is not None and scores.k >= top_k)}  # fmt: skip
        if top_k is not None:
            return lengths
        for name in self._files(key):
            n = int(name.split("-")[1])
            if 0 < n <= limit:
                lengths.add(n)
        return lengths

    def _get(self, model: Model, entry: tuple[str, int, str]) -> tuple | None:
        """(context, bytes, scores) of an entry, from memory or the folder; None."""
        held = self.entries.get(entry)
        if held is not None:
            self.entries.move_to_end(entry)
            if callable(held[0]):  # kept for later (put_later): made on its first hit
                held = (held[0](), *held[1:])
                self.entries[entry] = held
            return held
        path = self._path(entry)
        if path is None or not path.exists():
            return None
        try:
            context = load_state(path, model)
            if context.tokens != entry[1]:
                raise StateError(f"state file {path} holds {context.tokens} tokens")
        except StateError as e:
            self.stats.dropped += 1
            warnings.warn(f"state cache: dropped an entry that did not read back ({e})",
                          stacklevel=2)  # fmt: skip
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used
        self._remember(entry, context, model)
        return context, 0, None

    # -- writing ----------------------------------------------------------------------

    def put(self, model: Model, ids: Sequence[int] | np.ndarray, context: Context,
            scores: PromptScores | None = None) -> None:  # fmt: skip
        """Keeps `context`, the state after reading ids from the start of a document (and
        in memory, the ids' scores when given)."""
        ids = np.asarray(ids, np.int32)
        if context.state.batch_size != 1 or context.tokens != len(ids) or not len(ids):
            return
        key = numbers_key(model)
        entry = (key, len(ids), prefix_digests(key, ids, [len(ids)])[len(ids)])
        with self.lock:
            self._remember(entry, context, model, scores)
            path = self._path(entry)
            if path is not None and self.disk_bytes > 0 and not path.exists():
                self.folder.mkdir(parents=True, exist_ok=True)
                try:
                    save_state(path, model, context)
                except StateError as e:  # a full disk: the memory tier still holds it
                    warnings.warn(f"state cache: {e}", stacklevel=2)
                    return
                self._trim_folder()

    def put_later(self, model: Model, ids: Sequence[int] | np.ndarray,
                  make: Callable[[], Context]) -> None:  # fmt: skip
        """Keeps, in memory, the state after ids as `make()` gives it, made only if a
        later prompt begins with them (the state after a completion: most are never
        continued, so reading them again would cost every request for a few)."""
        ids = np.asarray(ids, np.int32)
        if not len(ids):
            return
        key = numbers_key(model)
        entry = (key, len(ids), prefix_digests(key, ids, [len(ids)])[len(ids)])
        with self.lock:
            if entry not in self.entries:
                self._remember(entry, make, model)

    def _remember(self, entry, context: Context, model: Model,
                  scores: PromptScores | None = None) -> None:  # fmt: skip
        if self.memory_bytes <= 0:
            return
        held = self.entries.get(entry)
        if held is not None and scores is None:
            scores = held[2]  # the same prefix: its scores stay
        size = model.state_bytes_per_sequence + (scores.nbytes if scores is not None else 0)
        self.entry_bytes += size - (held[1] if held is not None else 0)
        self.entries[entry] = (context, size, scores)
        self.entries.move_to_end(entry)
        self._evict()

    def _evict(self) -> None:
        """Least recently used prefixes out until they and the pinned entries fit."""
        pinned = sum(size for _, size in self.pins.values())
        while self.entries and self.entry_bytes + pinned > self.memory_bytes:
            _, (_, dropped, _) = self.entries.popitem(last=False)
            self.entry_bytes -= dropped

    # -- named entries ----------------------------------------------------------------

    def pin(self, name: str, model: Model, context: Context) -> None:
        """Keeps `context` under `name` until unpinned (it may replace one); the
        prefixes make room for it."""
        with self.lock:
            self.pins[name] = (context, model.state_bytes_per_sequence * context.state.batch_size)
            self._evict()

    def pinned(self, name: str) -> Context | None:
        with self.lock:
            held = self.pins.get(name)
            return held[0] if held is not None else None

    def unpin(self, name: str) -> bool:
        """Forgets the entry `name`; False if there was none."""
        with self.lock:
            return self.pins.pop(name, None) is not None

    def _trim_folder(self) -> None:
        """The folder back within disk_bytes, least recently used files first."""
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self._all_files()]
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.disk_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    # -- the folder -------------------------------------------------------------------

    def _path(self, entry) -> Path | None:
        if self.folder is None:
            return None
        key, n, digest = entry
        return self.folder / f"{key}-{n}-{digest}{SUFFIX}"

    def _files(self, key: str) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return [p.name for p in self._all_files() if p.name.startswith(key + "-")]

    def _all_files(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir()
                if p.suffix == SUFFIX and not p.name.startswith(".")]  # fmt: skip

    def info(self) -> dict:
        """Entries and bytes of each tier, with their bounds and the counts so far."""
        with self.lock:
            files = self._all_files()
            return {
                "memory_entries": len(self.entries), "memory_bytes": self.entry_bytes,
                "memory_limit": self.memory_bytes, "pinned_entries": len(self.pins),
                "pinned_bytes": sum(size for _, size in self.pins.values()),
                "folder": str(self.folder or ""),
                "disk_entries": len(files),
                "disk_bytes": sum(p.stat().st_size for p in files),
                "disk_limit": self.disk_bytes, **dataclasses.asdict(self.stats),
            }  # fmt: skip

    def clear(self) -> int:
        """Empties both tiers (not the pinned entries) → the number of files removed."""
        with self.lock:
            self.entries.clear()
            self.entry_bytes = 0
            files = self._all_files()
            for path in files:
                path.unlink(missing_ok=True)
            return len(files)


def score_prompt(model: Model, ids: Sequence[int] | np.ndarray, cache: StateCache | None,
                 top_k: int) -> tuple[PromptScores, Context, int]:  # fmt: skip
    """Every token's log-prob and top_k alternatives for a prompt read from the start of
    a document (`echo` with `logprobs`) → (its scores, the context after it, the tokens
    whose scores the cache held). Read from the longest prefix whose scores the cache
    holds, and kept there with its scores."""
    ids = np.asarray(ids, np.int32)
    n, start, held = cache.longest_scored(model, ids, top_k) if cache else (0, None, None)
    result, after = score_ids(model, ids[n:], start, top_k=top_k)
    scores = PromptScores(result.log_probs[0], result.top_log_probs[0], result.top_ids[0])
    if held is not None:
        scores = held.joined(scores)
    if cache is not None:
        cache.put(model, ids, after, scores)
    return scores, after, n
