"""The reader the training loop uses (docs/DESIGN.md section 11): `TokenShards`, one token
stream kept in several arrays (a prepared dataset's memory-mapped shards, tvq/corpus/shards.py),
and `TokenStream`, the windows of each update cut from it.

Reading the shards is index arithmetic on memory maps (numpy), not a data loader such as
Grain. A window is a pure function of the step: B contiguous rows of the stream, each
update `update_len` tokens further along, each epoch at a fresh random shift. So the
data position of a resumed run follows from the step that orbax already checkpoints,
and a process builds only the rows its devices hold by asking for those rows. Grain's
strengths (an iterator state to checkpoint, per-host sharding of records, worker
processes that prefetch and transform records) would each duplicate or fight this:
its sharding splits records between hosts, where tvq's rows are assigned by the device
mesh; its state would be a second copy of the step; and a window is a copy of
B·(update_len + 1) tokens from the page cache, which needs no prefetching. It would be a
dependency (with its own native packages) for none of that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tvq.errors import TrainingError


class TokenShards:
    """One token stream kept in several arrays (memory-mapped shards), read by position:
    a read copies only the pages it touches."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    @classmethod
    def of(cls, tokens) -> TokenShards:
        return tokens if isinstance(tokens, TokenShards) else cls([np.asarray(tokens)])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int32."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens {start}:{start + length} of a stream of {len(self)}")
        out = np.empty(length, np.int32)
        part = int(np.searchsorted(self.ends, start, side="right"))
        done = 0
        while done < length:
            begin = int(self.ends[part - 1]) if part else 0
            offset = start + done - begin
            take = min(length - done, len(self.parts[part]) - offset)
            out[done : done + take] = self.parts[part][offset : offset + take]
            done += take
            part += 1
        return out


class TokenStream:
    """Training tokens as B contiguous rows; windows advance along the rows, epoch after epoch.

    Each epoch starts the rows at a fresh random shift, so windows do not align the same way
    twice; the attention state is reset at the start of every epoch. The tokens are an
    array or `TokenShards` (the memory-mapped shards of a prepared dataset): the same
    stream gives the same windows.
    """

    def __init__(self, tokens, batch_size: int, update_len: int, seed: int) -> None:
        self.tokens = TokenShards.of(tokens)
        self.batch_size, self.update_len, self.seed = batch_size, update_len, seed
        self.row_len = len(self.tokens) // batch_size
        self.windows_per_epoch = (self.row_len - update_len - 1) // update_len
        if self.windows_per_epoch < 1:
            need = batch_size * (2 * update_len + 2)
            raise TrainingError(
                f"not enough training text: {len(self.tokens)} tokens, need at least {need} "
                f"for batch size {batch_size} and update length {update_len}"
            )

    def starts_epoch(self, step: int) -> bool:
        return step % self.windows_per_epoch == 0

    def window(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """Tokens [B, U + 1] of update `step` (inputs are [:, :-1], targets [:, 1:]), or of
        the batch rows `rows` only: a process reads just the rows its devices hold."""
        epoch, index = divmod(step, self.windows_per_epoch)
        shift = np.random.default_rng([self.seed, epoch]).integers(0, self.update_len)
        starts = np.arange(self.batch_size)[rows] * self.row_len + shift + index * self.update_len
        if not len(starts):
            return np.zeros([0, self.update_len + 1], np.int32)
        return np.stack([self.tokens.read(int(s), self.update_len + 1) for s in starts])
