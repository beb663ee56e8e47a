"""Model FLOP utilisation: analytic FLOPs per token × tokens/s over the measured peak.

    python bench/mfu.py [--model DIR] [--block-lens 32 64 128 256 512] [--tokens 32768]

FLOPs are counted by hand from docs/DESIGN.md section 4, two per multiply-add, for what the
blockwise algorithm computes per token at block length L (window W = M + L):
  per sublayer: projections 2·D·(2·H·K + 2·H·V) + 2·H·V·D; quantization 2·H·S·K;
  window scores 2·H·W·K, positional table 2·H·(M + 1)·K, codeword scores 2·H·S·K,
  weighted values 2·H·W·V + 2·H·S·V; eviction into the aggregate 2·H·S·V;
  output layer 2·D·N. Training counts 3× the forward (backward = 2× forward).
Peak: the best of float32 matmuls (1024² … 4096²) run in this same process. Scoring
throughput is model.score over --tokens tokens per block length; training throughput is
one compiled train step of the default recipe (16 × 256 tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_time  # noqa: E402

import tvq  # noqa: E402
from tvq.nn.state import initial_state  # noqa: E402
from tvq.train import TrainSettings, make_optimizer, make_train_step  # noqa: E402
from tvq.train.checkpoints import to_run_layout  # noqa: E402
from tvq.train.flops import flops_per_token  # noqa: E402  (bench/parallel.py and others take it from here)


def peak_flops() -> tuple[float, int]:
    best = (0.0, 0)
    for size in (1024, 2048, 4096):
        a = jnp.ones((size, size), jnp.float32)
        matmul = jax.jit(lambda x, y: x @ y)
        took = median_time(lambda a=a, f=matmul: f(a, a).block_until_ready(), repeats=5)
        best = max(best, (2 * size**3 / took, size))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--block-lens", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    model = tvq.load(args.model)
    cfg = model.config
    peak, size = peak_flops()
    print(f"# mfu: {machine()}; peak float32 matmul {peak / 1e9:.1f} GFLOP/s ({size}²)")
    print("block_len  MFLOP/token  score_tok/s  score_GFLOP/s  score_MFU")
    ids = np.random.default_rng(0).integers(3, cfg.n_vocab, (1, args.tokens))
    for block_len in args.block_lens:
        rate = args.tokens / median_time(lambda b=block_len: jax.block_until_ready(
            model.score(ids, ids, block_len=b)[0]), repeats=3)  # fmt: skip
        flops = flops_per_token(cfg, block_len)
        print(f"{block_len:>9}  {flops / 1e6:11.2f}  {rate:11.0f}  {rate * flops / 1e9:13.1f}  "
              f"{rate * flops / peak:9.1%}", flush=True)  # fmt: skip
    settings = TrainSettings()
    step = make_train_step(cfg, settings, make_optimizer(settings))
    batch, length = settings.batch_size, settings.update_len
    data = np.random.default_rng(1).integers(3, cfg.n_vocab, (batch, length + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    # the step's layout (stacked where the network scans), on copies: the step donates them
    carry = {"params": to_run_layout(jax.tree_util.tree_map(jnp.copy, model.params), cfg)}
    carry["opt"] = make_optimizer(settings).init(carry["params"])

    def train_once():
        params, opt, _, metrics = step(carry["params"], carry["opt"],
                                       to_run_layout(initial_state(cfg, batch), cfg), inputs,
                                       targets)  # fmt: skip
        jax.block_until_ready(metrics)
        carry["params"], carry["opt"] = params, opt

    rate = batch * length / median_time(train_once, repeats=5)
    flops = 3 * flops_per_token(cfg, settings.block_len)
    print(
        f"training (block_len {settings.block_len}, {batch}×{length} tokens per step): "
        f"{rate:.0f} tokens/s, {rate * flops / 1e9:.1f} GFLOP/s, MFU {rate * flops / peak:.1%}"
    )


if __name__ == "__main__":
    main()
