"""Scaling over devices: training step time and scoring many files on 1, 2 and 4
devices, side by side in one run; optionally the latency of one all-reduce between two
processes (the cost a cluster pays per collective).

    python bench/scaling.py [--devices 1 2 4] [--steps 5] [--files 8] [--rows 1] [--collectives]

Each device count runs in its own process with 4 forced CPU devices (XLA_FLAGS), the job
told to use 1, 2 or 4 of them, so only the split differs. On a CPU the forced devices
share the same cores: the ratios show the cost of partitioning, not a speed-up. On a
machine with real devices, run it without forcing (--real) to see the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(args) -> dict:
    """One device count: the measurements, as a dict."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import jax
    import numpy as np
    from common import median_time

    import tvq
    from tvq.distributed.devices import data_mesh, replicated, split_rows
    from tvq.nn.state import initial_state
    from tvq.runtime.model import init_params
    from tvq.scoring.batching import BatchScorer
    from tvq.train.settings import TrainSettings
    from tvq.train.step import compiled_step

    mesh = data_mesh(args.count)
    out = {"devices": mesh.size, "kind": jax.devices()[0].device_kind}
    model = tvq.load()
    config = model.config
    settings = TrainSettings(batch_size=args.batch, update_len=args.update_len, block_len=128)
    optimizer, step = compiled_step(config, settings)
    params = replicated(mesh, init_params(config, 0))
    opt_state = replicated(mesh, optimizer.init(init_params(config, 0)))
    state = split_rows(mesh, initial_state(config, args.batch))
    rng = np.random.default_rng(0)
    tokens = split_rows(mesh, rng.integers(3, config.n_vocab, (args.batch, args.update_len)))
    carry = [params, opt_state, state]

    def train_step():
        carry[:] = step(*carry, tokens, tokens)[:3]
        jax.block_until_ready(carry)

    seconds = median_time(train_step, repeats=args.steps)
    out["train_step_s"] = seconds
    out["train_tokens_per_s"] = args.batch * args.update_len / seconds

    text = b"".join(p.read_bytes() for p in sorted((ROOT / "tests" / "data").glob("*.txt")))
    sizes = [len(text) * (1 + i % 3) for i in range(args.files)]  # 1x to 3x the sample

    def score(rows: int):
        import io

        texts = [(f"f{i}", io.BytesIO((text * 3)[:n])) for i, n in enumerate(sizes)]
        return BatchScorer(model, texts, rows_per_device=rows, devices=args.count).run()

    out["score_tokens_per_s"] = {}
    for rows in args.rows:
        tokens = sum(r.tokens for r in score(rows))  # compiles
        seconds = median_time(lambda rows=rows: score(rows), repeats=3)
        out["score_tokens_per_s"][str(rows)] = tokens / seconds
    return out


def allreduce_latency(leaves: int, index: int, port: int) -> float | None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, index)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.make_array_from_callback(
        (len(jax.devices()), 1024),
        rows,
        lambda i: np.ones((len(jax.devices()), 1024), np.float32)[i],
    )
    total = jax.jit(lambda xs: [jnp.sum(a, axis=0) for a in xs],
                    out_shardings=NamedSharding(mesh, PartitionSpec()))  # fmt: skip
    jax.block_until_ready(total([x] * leaves))
    started = time.perf_counter()
    for _ in range(20):
        jax.block_until_ready(total([x] * leaves))
    return (time.perf_counter() - started) / 20 if index == 0 else None


def run_child(extra: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, *extra], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--update-len", type=int, default=256)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[1],
                        help="files in flight per device (each measured)")  # fmt: skip
    parser.add_argument("--real", action="store_true", help="do not force CPU devices")
    parser.add_argument("--collectives", action="store_true",
                        help="also time all-reduces between 2 processes")  # fmt: skip
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.count = args.child
        print(json.dumps(child(args)))
        return
    if args.latency is not None:
        print(json.dumps({"seconds": allreduce_latency(*args.latency)}))
        return

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not args.real:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(args.devices)}"
    import jax

    print(f"# scaling: {os.cpu_count()} cores, jax {jax.__version__}; global batch "
          f"{args.batch} x {args.update_len} tokens, built-in architecture; {args.files} files "
          f"scored with {'/'.join(map(str, args.rows))} row(s) per device"
          f"{'' if args.real else '; forced CPU devices'}")  # fmt: skip
    rows = [run_child([str(a) for a in ("--child", n, "--steps", args.steps, "--batch",
                                        args.batch, "--update-len", args.update_len,
                                        "--files", args.files, "--rows", *args.rows)], env)
            for n in args.devices]  # fmt: skip
    base = rows[0]
    first = str(args.rows[0])
    print(
        "devices  train step s  train tok/s  ratio  "
        + "  ".join(f"score tok/s ({k} row{'s' if k > 1 else ''})  ratio" for k in args.rows)
    )
    for r in rows:
        cells = "  ".join(
            f"{r['score_tokens_per_s'][str(k)]:>{22 + (k > 1)}.0f}  "
            f"{r['score_tokens_per_s'][str(k)] / base['score_tokens_per_s'][first]:5.2f}"
            for k in args.rows
        )
        print(
            f"{r['devices']:>7}  {r['train_step_s']:12.3f}  {r['train_tokens_per_s']:11.0f}  "
            f"{r['train_tokens_per_s'] / base['train_tokens_per_s']:5.2f}  {cells}"
        )
    if args.collectives:
        two = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        print("\n# all-reduce between 2 processes x 2 CPU devices (Gloo over 127.0.0.1)")
        print("arrays per call  ms per call")
        for leaves in (1, 20):
            port = 29000 + leaves + os.getpid() % 500
            other = subprocess.Popen([sys.executable, __file__, "--latency", str(leaves), "1",
                                      str(port)], env=two, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
            result = run_child(["--latency", str(leaves), "0", str(port)], two)
            other.wait()
            print(f"{leaves:>15}  {result['seconds'] * 1000:11.1f}")


if __name__ == "__main__":
    main()
