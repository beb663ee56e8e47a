"""The serial and the parallel form side by side on this machine (docs/DESIGN.md section 8).

    python bench/parallel.py [--model DIR] [--lengths 8192 65536 524288] [--repeats 3]

Scoring: tokens/s of the built-in model over texts of each length, batch 1, in the
CLI's streaming path (tvq.scoring.stream.score_ids: 8,192-token compiled calls carrying the
state), serial and parallel in alternating rounds; MFU from bench/mfu.py's FLOP count
and the float32 matmul peak measured in the same run. Training: tokens/s and MFU of one
compiled step of the default recipe (16 × 256 tokens) in each form.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_time  # noqa: E402
from mfu import flops_per_token, peak_flops  # noqa: E402

import tvq  # noqa: E402
from tvq.nn.state import initial_state  # noqa: E402
from tvq.runtime.context import score_ids  # noqa: E402
from tvq.train import TrainSettings, make_optimizer, make_train_step  # noqa: E402
from tvq.train.checkpoints import to_run_layout  # noqa: E402

FORMS = ("serial", "parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 65536, 524288])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = tvq.load(args.model)
    models = {form: dataclasses.replace(base, algorithm=form) for form in FORMS}
    peak, _ = peak_flops()
    flops = flops_per_token(base.config, base.block_len)
    print(f"# parallel: {machine()}; peak float32 matmul {peak / 1e9:.1f} GFLOP/s; "
          f"block_len {base.block_len}")  # fmt: skip
    ids = np.random.default_rng(0).integers(3, base.config.n_vocab, max(args.lengths))
    for model in models.values():  # compile every shape first
        score_ids(model, ids[: 8192 + 4096 + 2048])
    print("tokens  serial_tok/s  parallel_tok/s  parallel/serial  serial_MFU  parallel_MFU")
    for length in args.lengths:
        times = {form: [] for form in FORMS}
        for _ in range(args.repeats if length <= 65536 else 1):
            for form, model in models.items():
                start = time.perf_counter()
                score_ids(model, ids[:length])
                times[form].append(time.perf_counter() - start)
        rate = {form: length / statistics.median(times[form]) for form in FORMS}
        print(f"{length:>6}  {rate['serial']:12.0f}  {rate['parallel']:14.0f}  "
              f"{rate['parallel'] / rate['serial']:15.2f}  {rate['serial'] * flops / peak:10.1%}  "
              f"{rate['parallel'] * flops / peak:12.1%}", flush=True)  # fmt: skip

    settings = TrainSettings()
    batch, length = settings.batch_size, settings.update_len
    data = np.random.default_rng(1).integers(3, base.config.n_vocab, (batch, length + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    optimizer = make_optimizer(settings)
    for form in FORMS:
        step = make_train_step(base.config, settings, optimizer, form)
        # the step's layout (stacked where the network scans), on copies: the step donates them
        carry = {"params": to_run_layout(jax.tree_util.tree_map(jnp.copy, base.params),
                                         base.config)}  # fmt: skip
        carry["opt"] = optimizer.init(carry["params"])

        def once(step=step, carry=carry):
            state = to_run_layout(initial_state(base.config, batch), base.config)
            params, opt, _, metrics = step(carry["params"], carry["opt"], state, inputs, targets)
            jax.block_until_ready(metrics)
            carry["params"], carry["opt"] = params, opt

        rate = batch * length / median_time(once, repeats=args.repeats + 2)
        mfu = rate * 3 * flops_per_token(base.config, settings.block_len) / peak
        print(f"training {form} (block_len {settings.block_len}, {batch}×{length} tokens per "
              f"step): {rate:.0f} tokens/s, MFU {mfu:.1%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
