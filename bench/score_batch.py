"""Scoring throughput of the default model by batch size (does batching files pay?).

    python bench/score_batch.py [--model DIR] [--tokens 16384] [--batches 1 2 4]

Tokens/s is the median of several timed runs of model.score over --tokens tokens per
row, after compilation, all measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_time  # noqa: E402

import tvq  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--block-len", type=int, default=None)
    args = parser.parse_args()
    model = tvq.load(args.model)
    block_len = args.block_len or model.block_len
    print(f"# score_batch: {machine()}; {args.tokens} tokens per row; block_len {block_len}")
    print("batch  tokens/s  ratio")
    base = None
    for batch in args.batches:
        ids = np.random.default_rng(0).integers(3, model.config.n_vocab, (batch, args.tokens))

        def run(ids=ids):
            jax.block_until_ready(model.score(ids, ids, block_len=block_len)[0])

        rate = batch * args.tokens / median_time(run, repeats=3)
        base = base or rate
        print(f"{batch:>5}  {rate:8.0f}  {rate / base:5.2f}")


if __name__ == "__main__":
    main()
