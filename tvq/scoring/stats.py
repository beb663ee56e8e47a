"""The statistics of a scored text (docs/DESIGN.md section 8), in constant memory:
totals, words, the standard error of the mean NLL by batch means, NLL and bits per byte
by token position (the long-context curve), and the comparison with a baseline (KL
divergence in log-spaced bins for its percentile)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The long-context curve: token positions 0-128, 128-256, ... doubling to the end.
FIRST_BUCKET = 128


def position_bucket(positions: np.ndarray) -> np.ndarray:
    """Bucket index of token positions: 0 for [0, 128), k for [128·2^(k−1), 128·2^k)."""
    scaled = np.maximum(np.asarray(positions, np.int64) // FIRST_BUCKET, 0)
    return np.where(scaled == 0, 0, np.floor(np.log2(np.maximum(scaled, 1))).astype(np.int64) + 1)


def bucket_bounds(index: int) -> tuple[int, int]:
    return (0, FIRST_BUCKET) if index == 0 else (FIRST_BUCKET << (index - 1), FIRST_BUCKET << index)


# Tokens per block for the standard error: tokens are correlated, so the error of the
# mean token NLL is taken over the means of consecutive blocks (batch means).
ERROR_BLOCK = 256


def _exp(x: float) -> float | None:
    """exp(x), or None where it overflows a float (a text of few, very unlikely words)."""
    return math.exp(x) if x < 709.0 else None


def _merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]):
    """(count, mean, M2) of two groups merged (Chan et al.'s pairwise update)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    if n == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


@dataclasses.dataclass
class FileScore:
    """Totals for one text; `nll` in nats per token. Also its words (whitespace-separated,
    counted as bytes are read) and the moments of its ERROR_BLOCK-token block means,
    from which the standard error of `nll` comes (in constant memory)."""

    file: str
    bytes: int = 0
    tokens: int = 0
    nll_sum: float = 0.0
    invalid_utf8: bool = False
    protocol: str = "full"  # full, window or stride (tvq.scoring.stream.score_stream)
    window: int | None = None
    stride: int | None = None
    words: int = 0
    in_word: bool = False  # the last byte read was part of a word
    blocks: int = 0  # complete blocks of ERROR_BLOCK tokens
    block_mean: float = 0.0  # mean of their mean NLLs
    block_m2: float = 0.0  # Σ (block mean − block_mean)²
    partial_tokens: int = 0  # tokens of the block being filled
    partial_sum: float = 0.0
    # [tokens, Σ NLL, bytes] per position bucket (position_bucket), when asked for; the
    # baseline's too when there is one
    by_position: list[list[float]] | None = None
    baseline_by_position: list[list[float]] | None = None
    # against a baseline model (tvq.scoring.compare), when there is one
    baseline_nll_sum: float = 0.0
    kl_sum: float = 0.0
    same_top1: int = 0
    kl_counts: list[int] | None = None  # tvq.scoring.compare.kl_histogram, summed

    def add_comparison(self, parts: dict) -> None:
        """Folds the baseline's per-token numbers (tvq.scoring.compare.compare_ids) in."""
        self.baseline_nll_sum += float(parts["baseline_nll"].astype(np.float64).sum())
        self.kl_sum += float(parts["kl"].astype(np.float64).sum())
        self.same_top1 += int(parts["same_top1"].sum())
        counts = kl_histogram(parts["kl"])
        self.kl_counts = (
            counts + np.asarray(self.kl_counts) if self.kl_counts else counts
        ).tolist()

    def count_words(self, data: bytes) -> None:
        """Counts the words in the next bytes of the text (a word may span reads)."""
        if not data:
            return
        words = len(data.split())
        if words and self.in_word and not data[:1].isspace():
            words -= 1  # the first one continues the last read's word
        self.words += words
        self.in_word = not data[-1:].isspace()

    def add_nll(self, nll) -> None:
        """Folds the next tokens' NLLs (nats, in text order) into the error blocks."""
        values = np.asarray(nll, np.float64).reshape(-1)
        if not len(values):
            return
        need = ERROR_BLOCK - self.partial_tokens
        if len(values) < need:
            self.partial_tokens += len(values)
            self.partial_sum += float(values.sum())
            return
        first = self.partial_sum + float(values[:need].sum())
        rest = values[need:]
        whole = len(rest) // ERROR_BLOCK * ERROR_BLOCK
        sums = np.concatenate([[first], rest[:whole].reshape(-1, ERROR_BLOCK).sum(axis=1)])
        means = sums / ERROR_BLOCK
        batch = (len(means), float(means.mean()), float(((means - means.mean()) ** 2).sum()))
        self.blocks, self.block_mean, self.block_m2 = _merge_moments(
            (self.blocks, self.block_mean, self.block_m2), batch
        )
        self.partial_tokens = len(rest) - whole
        self.partial_sum = float(rest[whole:].sum())

    def add_positions(self, start: int, nll, token_bytes, baseline_nll=None) -> None:
        """Folds the NLLs and byte lengths of the tokens at positions start, start+1, …
        into the position buckets (when by_position is on), and the baseline's NLLs into
        its own."""
        if self.by_position is not None:
            _fold_positions(self.by_position, start, nll, token_bytes)
        if self.baseline_by_position is not None and baseline_nll is not None:
            _fold_positions(self.baseline_by_position, start, baseline_nll, token_bytes)

    def position_rows(self) -> list[dict]:
        """by_position as {start, end, tokens, nll, bits_per_byte} per bucket."""
        return _position_rows(self.by_position)

    @property
    def nll_stderr(self) -> float | None:
        """Standard error of the mean token NLL by batch means (None below 2 blocks)."""
        if self.blocks < 2:
            return None
        return math.sqrt(self.block_m2 / (self.blocks - 1) / self.blocks)

    @classmethod
    def total(cls, scores: list[FileScore], name: str = "TOTAL") -> FileScore:
        """The scores of several texts together (their blocks pooled)."""
        first = scores[0] if scores else cls(name)
        curves = {key: None if getattr(first, key) is None else []
                  for key in ("by_position", "baseline_by_position")}  # fmt: skip
        total = cls(name, protocol=first.protocol, window=first.window, stride=first.stride,
                    **curves)  # fmt: skip
        for s in scores:
            if s.kl_counts is not None:
                total.baseline_nll_sum += s.baseline_nll_sum
                total.kl_sum += s.kl_sum
                total.same_top1 += s.same_top1
                mine = total.kl_counts or []
                total.kl_counts = (np.add(mine, s.kl_counts).tolist() if mine and s.kl_counts
                                   else list(mine or s.kl_counts))  # fmt: skip
            for mine, theirs in ((total.by_position, s.by_position),
                                 (total.baseline_by_position, s.baseline_by_position)):  # fmt: skip
                for index, cell in enumerate(theirs or []):
                    while len(mine) <= index:
                        mine.append([0, 0.0, 0])
                    mine[index] = [a + b for a, b in zip(mine[index], cell, strict=True)]
            total.bytes += s.bytes
            total.tokens += s.tokens
            total.nll_sum += s.nll_sum
            total.words += s.words
            total.blocks, total.block_mean, total.block_m2 = _merge_moments(
                (total.blocks, total.block_mean, total.block_m2),
                (s.blocks, s.block_mean, s.block_m2),
            )
        return total

    def row(self) -> dict:
        nll = self.nll_sum / self.tokens if self.tokens else 0.0
        stderr = self.nll_stderr
        return {
            "file": self.file,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "nll": nll,
            "perplexity": math.exp(nll),
            "bits_per_token": nll / math.log(2),
            "bits_per_byte": self.nll_sum / math.log(2) / self.bytes if self.bytes else 0.0,
            "words": self.words,
            "word_perplexity": _exp(self.nll_sum / self.words) if self.words else None,
            "nll_stderr": stderr,
            "perplexity_ci95": None if stderr is None else
            [math.exp(nll - 1.96 * stderr), math.exp(nll + 1.96 * stderr)],
            "protocol": self.protocol,
            "window": self.window,
            "stride": self.stride,
        } | ({} if self.by_position is None else {"by_position": self.position_rows()}) \
          | self.comparison_row()  # fmt: skip

    def comparison_row(self) -> dict:
        """kl_divergence (mean KL(baseline ‖ model) per token, nats), its 99th
        percentile, delta_nll (model − baseline, nats per token), same_top1; and the
        baseline's curve (baseline_by_position) when by_position is on."""
        if self.kl_counts is None:
            return {}
        tokens = max(self.tokens, 1)
        curve = self.baseline_by_position
        return {
            "kl_divergence": self.kl_sum / tokens,
            "kl_divergence_p99": kl_percentile(self.kl_counts, 99),
            "delta_nll": (self.nll_sum - self.baseline_nll_sum) / tokens,
            "same_top1": self.same_top1 / tokens,
        } | ({} if curve is None else {"baseline_by_position": _position_rows(curve)})


def _fold_positions(cells: list[list], start: int, nll, token_bytes) -> None:
    """Adds [tokens, Σ NLL, bytes] of the tokens at positions start, start+1, … to their
    position buckets' cells."""
    if not len(nll):
        return
    buckets = position_bucket(start + np.arange(len(nll)))
    nll, token_bytes = np.asarray(nll, np.float64), np.asarray(token_bytes)
    for index in np.unique(buckets):
        mask = buckets == index
        while len(cells) <= index:
            cells.append([0, 0.0, 0])
        cell = cells[index]
        cell[0] += int(mask.sum())
        cell[1] += float(nll[mask].sum())
        cell[2] += int(token_bytes[mask].sum())


def _position_rows(cells: list[list] | None) -> list[dict]:
    """Position-bucket cells as {start, end, tokens, nll, bits_per_byte} per bucket."""
    rows = []
    for index, (tokens, nll_sum, n_bytes) in enumerate(cells or []):
        start, end = bucket_bounds(index)
        nll = nll_sum / tokens if tokens else None
        bits = nll_sum / math.log(2) / n_bytes if n_bytes else None
        rows.append({"start": start, "end": end, "tokens": tokens, "nll": nll,
                     "bits_per_byte": bits})  # fmt: skip
    return rows


# KL values are binned on a log scale (0.01 decades from 1e-10 to 1e3 nats) for the
# 99th percentile, in constant memory.
KL_EDGES = np.logspace(-10, 3, 1301)


def kl_histogram(kl: np.ndarray) -> np.ndarray:
    """Counts per bin: bin 0 holds KL < 1e-10, bin i KL in [edge i−1, edge i)."""
    return np.bincount(np.searchsorted(KL_EDGES, kl, side="right"), minlength=len(KL_EDGES) + 1)


def kl_percentile(counts, q: float) -> float | None:
    """The upper edge of the bin holding the q-th percentile: 0 below 1e-10, None
    without tokens."""
    counts = np.asarray(counts)
    total = counts.sum()
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q / 100 * total))
    return 0.0 if index == 0 else float(KL_EDGES[min(index, len(KL_EDGES) - 1)])
