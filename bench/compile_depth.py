"""Compile time against depth: fresh parameters, the first scoring call and the first
training step at several layer counts, side by side with the ratio to the shallowest.
The layers run as one scan over stacked parameters (docs/DESIGN.md section 5), so these
must stay nearly flat; they grew linearly while the layers were unrolled.

    python bench/compile_depth.py [--layers 2 8 24 48] [--d-model 128] [--tokens 512]
                                  [--batch 2] [--update-len 256]

Each layer count runs in a fresh process (nothing traced or compiled is shared; JAX's
persistent cache off). A phase's compile seconds are its first call's time less its
second call's (the same call, compiled): tracing, lowering and XLA's compilation of
every program the call needs; `xla` is XLA's compilation alone (jax.monitoring).
The architecture is ModelConfig's defaults with --d-model (the issue's figures: 2 heads,
d_k 64, d_v 256, 256 codes, 128-token memory, bytes); scoring and training use blocks
of 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
PHASES = ("init", "score", "train")


def child(args: argparse.Namespace) -> dict:
    """One layer count: {phase: [compile seconds, XLA seconds, first call, second call]}."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tvq
    from tvq.runtime.model import init_params
    from tvq.train.checkpoints import to_run_layout
    from tvq.train.settings import TrainSettings
    from tvq.train.step import make_optimizer, make_train_step

    spent = {"xla": 0.0}

    def listener(event, duration, **kwargs):
        if event == BACKEND_EVENT:
            spent["xla"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)

    def timed(fn):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        return out, time.perf_counter() - start

    def first_call(fn, again=None):
        """fn() twice (the second time again(), if given): the first call's extra time
        over the second is tracing, lowering and compiling."""
        spent["xla"] = 0.0
        out, first = timed(fn)
        xla = spent["xla"]
        _, second = timed(again or fn)
        return out, [max(first - second, 0.0), xla, first, second]

    config = tvq.ModelConfig(d_model=args.d_model, n_layer=args.layers[0])
    result = {}
    params, result["init"] = first_call(lambda: init_params(config, 0))
    model = tvq.Model(config, params, block_len=128, algorithm="serial")
    ids = np.random.default_rng(0).integers(0, config.n_vocab, (1, args.tokens + 1))
    _, result["score"] = first_call(lambda: model.score(ids[:, :-1], ids[:, 1:])[0])
    settings = TrainSettings(batch_size=args.batch, update_len=args.update_len, block_len=128)
    optimizer = make_optimizer(settings)
    step = make_train_step(config, settings, optimizer, "serial")
    data = np.random.default_rng(1).integers(0, config.n_vocab, (args.batch, args.update_len + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    params, state = to_run_layout((params, model.initial_state(args.batch)), config)
    opt_state = optimizer.init(params)  # the step's layout: stacked where the network scans
    # The step donates its inputs: each call takes its own copies, made beforehand.
    first, second = [
        jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, (params, opt_state, state)))
        for _ in range(2)
    ]
    _, result["train"] = first_call(
        lambda: step(*first, inputs, targets)[3].loss,
        lambda: step(*second, inputs, targets)[3].loss,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24, 48])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512, help="tokens scored")
    parser.add_argument("--batch", type=int, default=2, help="training rows")
    parser.add_argument("--update-len", type=int, default=256, help="training window")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false", PYTHONPATH=str(ROOT))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    results = {}
    for layers in args.layers:
        cmd = [sys.executable, __file__, "--child", "--layers", str(layers),
               "--d-model", str(args.d_model), "--tokens", str(args.tokens),
               "--batch", str(args.batch), "--update-len", str(args.update_len)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{layers} layers failed:\n{done.stderr[-3000:]}")
        results[layers] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {layers} layers: {results[layers]}", file=sys.stderr, flush=True)
    print(f"# compile_depth: {machine()}; d_model {args.d_model}, other fields ModelConfig's "
          f"defaults; scoring {args.tokens} tokens, training {args.batch} x {args.update_len} "
          "tokens, blocks of 128, serial form")  # fmt: skip
    print("seconds to trace, lower and compile (the first call less the second); xla: XLA's "
          f"compilation alone; ratio: to {args.layers[0]} layers")  # fmt: skip
    header = "".join(f"{p:>9}{'xla':>7}{'ratio':>7}" for p in PHASES)
    print(f"{'layers':>6}{header}")
    base = results[args.layers[0]]
    for layers, row in results.items():
        cells = "".join(
            f"{row[p][0]:>9.2f}{row[p][1]:>7.2f}{row[p][0] / base[p][0]:>7.2f}" for p in PHASES
        )
        print(f"{layers:>6}{cells}")


if __name__ == "__main__":
    main()
