"""Speed of the working tree against an earlier revision, side by side in one run: a
refactor must not slow tvq down.

    python bench/revisions.py REV [--rounds 4] [--tokens 300] [--score-tokens 8192]
                              [--temperature 0] [--top-p 1] [--algorithm serial|parallel]
                              [--train]

REV is checked out into a temporary git worktree. Each round runs one fresh process per
tree, alternating, so drift of the machine hits both alike; each process loads the
built-in model, warms up, then times decoding at batch 1 (`generate`, tokens/s; greedy,
or the sampler `--temperature` and `--top-p` give: the CLI's default is 0.8 and 0.95)
and scoring (`score_ids`, tokens/s, in the form `--algorithm` names; default: the
device's), and with --train one step of the default training recipe (tokens/s), median
of 3. The table gives medians over rounds and the ratio working tree / REV (above 1:
the working tree is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import dataclasses, json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
import tvq
try:  # the public face (tvq/__init__.py), or the flat layout of revisions before it
    from tvq import Sampler, generate, score_ids
except ImportError:
    from tvq.decoding import generate
    from tvq.sampling import Sampler
    from tvq.scoring import score_ids
args = json.loads(sys.argv[1])
sampler = Sampler(temperature=args["temperature"], top_p=args["top_p"])
model = tvq.load()
if args["algorithm"] != "default":
    model = dataclasses.replace(model, algorithm=args["algorithm"])
prompt = model.tokenizer.encode("To be, or not to be, that is the question:")
ids = np.random.default_rng(0).integers(3, model.config.n_vocab, args["score_tokens"])
def decode():
    r = generate(model, prompt, max_tokens=args["tokens"], sampler=sampler,
                 ignore_eos=True)
    return r.generated_tokens / r.generate_seconds
def score():
    start = time.perf_counter()
    result, _ = score_ids(model, ids)
    return len(ids) / (time.perf_counter() - start)
rates = {"decode": decode, "score": score}
if args["train"]:
    from tvq.train import TrainSettings, make_optimizer, make_train_step
    try:  # the step's one layout (stacked where the network scans)
        from tvq.train.checkpoints import to_run_layout
    except ImportError:  # revisions whose step took the files' layout too
        to_run_layout = lambda tree, config: tree
    settings = TrainSettings()
    rows, length = settings.batch_size, settings.update_len
    data = np.random.default_rng(1).integers(3, model.config.n_vocab, (rows, length + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    optimizer = make_optimizer(settings)
    step = make_train_step(model.config, settings, optimizer, model.algorithm)
    params = jax.tree_util.tree_map(jnp.copy, model.params)  # the step may donate them
    params = to_run_layout(params, model.config)
    carry = [params, optimizer.init(params)]
    def train():
        start = time.perf_counter()
        state = to_run_layout(model.initial_state(rows), model.config)
        params, opt, _, metrics = step(*carry, state, inputs, targets)
        jax.block_until_ready(metrics)
        carry[:] = params, opt
        return rows * length / (time.perf_counter() - start)
    rates["train"] = train
for rate in rates.values():
    rate()
print(json.dumps({name: statistics.median(rate() for _ in range(3))
                  for name, rate in rates.items()}))
"""
COLUMNS = {"decode": "decode tok/s", "score": "score tok/s", "train": "train tok/s"}


def measure(tree: Path, args: argparse.Namespace, cache: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_COMPILATION_CACHE_DIR=cache)
    settings = {name: getattr(args, name) for name in (
        "tokens", "score_tokens", "temperature", "top_p", "algorithm", "train")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(settings)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rev")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--score-tokens", type=int, default=8192)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--algorithm", choices=("default", "serial", "parallel"),
                        default="default")  # fmt: skip
    parser.add_argument("--train", action="store_true", help="also time a training step")
    args = parser.parse_args()
    known = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q",
                            f"{args.rev}^{{commit}}"], capture_output=True)  # fmt: skip
    if known.returncode != 0:
        parser.error(f"{args.rev} is not a commit of this repository")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base),
                        args.rev], check=True)  # fmt: skip
        try:
            trees = {args.rev: base, "working tree": ROOT}
            results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    results[name].append(measure(tree, args, str(Path(tmp) / "cache")))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    print(f"# revisions: {machine()}; {args.rounds} rounds, alternating; decoding at "
          f"temperature {args.temperature}, top-p {args.top_p}; scoring in the "
          f"{args.algorithm} form")  # fmt: skip
    columns = [name for name in COLUMNS if name in results["working tree"][0]]
    print(f"{'':24}" + "".join(f"{COLUMNS[name]:>14}" for name in columns))
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(r[k] for r in runs) for k in columns}
        print(f"{name:24}" + "".join(f"{medians[name][k]:>14.0f}" for k in columns))
    new, old = medians["working tree"], medians[args.rev]
    print(f"{'ratio (working / ' + args.rev[:10] + ')':24}"
          + "".join(f"{new[k] / old[k]:>14.3f}" for k in columns))  # fmt: skip


if __name__ == "__main__":
    main()
