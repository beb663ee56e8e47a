"""Scoring throughput against length: time per token must not grow (linear time).

    python bench/score_length.py [--model DIR] [--lengths 1024 8192 65536 524288 2097152]
                                 [--batches 1 2 4] [--batch-length 65536]

Random tokens are scored as `tvq score` does (score_ids: pieces of a few thousand tokens
streamed through the fixed-size state). Batch 1 at every length; the other batch sizes
at --batch-length, to find the best one. Times are medians of --repeats runs (one run
above 100k tokens) after a compiling run, all in this one invocation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.runtime.context import score_ids  # noqa: E402


def seconds(model, ids, repeats: int) -> float:
    score_ids(model, ids[:, :8192])  # compiles every piece shape the long run uses
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score_ids(model, ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 8192, 65536, 524288, 2097152])  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--batch-length", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = tvq.load(args.model)
    rng = np.random.default_rng(0)
    print(f"# score_length: {machine()}; block_len {model.block_len}")
    print("batch    tokens  seconds  tokens/s  us/token")
    per_token = {}
    for batch, length in [(1, n) for n in args.lengths] + [(b, args.batch_length)
                                                          for b in args.batches]:  # fmt: skip
        ids = rng.integers(3, model.config.n_vocab, size=(batch, length))
        took = seconds(model, ids, args.repeats if length <= 100_000 else 1)
        per_token[batch, length] = took / (batch * length)
        print(f"{batch:>5}  {length:>8}  {took:7.2f}  {batch * length / took:8.0f}  "
              f"{1e6 * per_token[batch, length]:8.2f}", flush=True)  # fmt: skip
    if (1, 8192) in per_token:
        longest = max(n for b, n in per_token if b == 1)
        print(
            f"time per token, {longest} vs 8192 tokens: "
            f"{per_token[1, longest] / per_token[1, 8192]:.3f}"
        )


if __name__ == "__main__":
    main()
