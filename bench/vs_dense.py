"""tvq against a quadratic-time transformer of the same shape (bench/dense.py).

    python bench/vs_dense.py [--model DIR] [--score-lengths 1024 … 32768]
                             [--positions 200 2000 20000 100000] [--batches 1 8]

Scoring: seconds to score T random tokens, tvq (streaming through its fixed-size state,
as `tvq score` does) and dense (full causal attention over the whole sequence), the
speed-up, and the ratio of their FLOPs per token (bench/mfu.py and bench/dense.py count
them): the speed-up that equal efficiency would give. Decoding: ms per token when the
context already holds P tokens, tvq (the real `generate` path, greedy) and dense (KV
cache of P entries, greedy). Every number is a median of repeats after a compiling run,
all measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense  # noqa: E402
from common import machine, median_time  # noqa: E402
from mfu import flops_per_token  # noqa: E402

import tvq  # noqa: E402
from tvq.decoding import generate  # noqa: E402
from tvq.runtime.context import score_ids  # noqa: E402
from tvq.text.sampling import Sampler  # noqa: E402

KV_CACHE_LIMIT = 6 * 2**30  # bytes: larger dense caches are not attempted


def scoring(model, lengths, repeats):
    rng = np.random.default_rng(0)
    print("\n## scoring (batch 1)")
    print("tokens  tvq_s  tvq_tok/s  dense_s  dense_tok/s  tvq_speedup  flop_ratio")
    tvq_flops = flops_per_token(model.config, model.block_len)
    for length in lengths:
        ids = rng.integers(3, model.config.n_vocab, size=(1, length + 1))
        inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
        n = 1 if length > 8192 else repeats
        tvq_s = median_time(lambda ids=ids: score_ids(model, ids[:, 1:]), n)
        dense_s = median_time(lambda a=inputs, b=targets: jax.block_until_ready(
            dense.score(model.config, model.params, a, b)), n)  # fmt: skip
        flop_ratio = dense.flops_per_token(model.config, length) / tvq_flops
        print(f"{length:>6}  {tvq_s:6.2f}  {length / tvq_s:9.0f}  {dense_s:7.2f}  "
              f"{length / dense_s:11.0f}  {dense_s / tvq_s:11.2f}  {flop_ratio:10.2f}",
              flush=True)  # fmt: skip


def decoding(model, positions, batches, tokens, repeats):
    rng = np.random.default_rng(1)
    cfg = model.config
    print(f"\n## decoding (greedy, ms per token of each row, {tokens} tokens per timing)")
    print("batch  position  tvq_ms  tvq_tok/s  dense_ms  dense_tok/s  tvq_speedup")
    contexts = {}
    for position in positions:
        contexts[position] = score_ids(model, rng.integers(3, cfg.n_vocab, size=position))[1]
    for batch in batches:
        for position in positions:

            def run_tvq(context=contexts[position], batch=batch):
                return generate(model, [], max_tokens=tokens, sampler=Sampler(temperature=0),
                                num_samples=batch, context=context)  # fmt: skip

            run_tvq()  # compile and warm up
            tvq_ms = statistics.median(
                1000 * run_tvq().generate_seconds / tokens for _ in range(repeats)
            )
            cache_bytes = 4 * 2 * cfg.n_layer * batch * cfg.n_head * position * (cfg.d_k + cfg.d_v)
            dense_ms = float("nan")
            if cache_bytes <= KV_CACHE_LIMIT:
                steps = max(4, min(tokens, 2_000_000 // position))
                key = jax.random.PRNGKey(0)
                token = jnp.zeros([batch], jnp.int32)

                def run_dense(steps=steps, batch=batch, position=position, key=key, token=token):
                    cache = dense.empty_cache(cfg, batch, position + steps, key)
                    jax.block_until_ready(cache)
                    start = time.perf_counter()
                    jax.block_until_ready(dense.decode(cfg, model.params, cache, token,
                                                       position, steps))  # fmt: skip
                    return (time.perf_counter() - start) / steps

                run_dense()
                dense_ms = 1000 * statistics.median(run_dense() for _ in range(repeats))
            print(f"{batch:>5}  {position:>8}  {tvq_ms:6.3f}  {batch * 1000 / tvq_ms:9.0f}  "
                  f"{dense_ms:8.3f}  {batch * 1000 / dense_ms:11.0f}  "
                  f"{dense_ms / tvq_ms:11.2f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--score-lengths", type=int, nargs="*",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])  # fmt: skip
    parser.add_argument("--positions", type=int, nargs="*", default=[200, 2000, 20000, 100000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = tvq.load(args.model)
    cfg = model.config
    print(f"# vs_dense: {machine()}; block_len {model.block_len}")
    print(f"# tvq: {model.param_count:,} parameters; dense: {dense.param_count(model.params):,} "
          f"(d_model {cfg.d_model}, {cfg.n_layer} layers × 2 sublayers, {cfg.n_head} heads, "
          f"d_k {cfg.d_k}, d_v {cfg.d_v}, vocabulary {cfg.n_vocab}); dense KV caches over "
          f"{KV_CACHE_LIMIT / 2**30:.0f} GiB are skipped (nan)")  # fmt: skip
    if args.score_lengths:
        scoring(model, args.score_lengths, args.repeats)
    if args.positions:
        decoding(model, args.positions, args.batches, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
