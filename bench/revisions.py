"""Speed of the working tree against an earlier revision, side by side in one run: a
refactor must not slow tvq down.

    python bench/revisions.py REV [--rounds 4] [--tokens 300] [--score-tokens 8192]
                              [--temperature 0] [--top-p 1] [--algorithm serial|parallel]

REV is checked out into a temporary git worktree. Each round runs one fresh process per
tree, alternating, so drift of the machine hits both alike; each process loads the
built-in model, warms up, then times decoding at batch 1 (`generate`, tokens/s; greedy,
or the sampler `--temperature` and `--top-p` give: the CLI's default is 0.8 and 0.95)
and scoring (`score_ids`, tokens/s, in the form `--algorithm` names; default: the
device's), median of 3. The table gives medians over rounds and the ratio working tree
/ REV (above 1: the working tree is faster).
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
import jax, numpy as np
import tvq
from tvq.decoding import generate
from tvq.sampling import Sampler
from tvq.scoring import score_ids
tokens, score_tokens = int(sys.argv[1]), int(sys.argv[2])
sampler = Sampler(temperature=float(sys.argv[3]), top_p=float(sys.argv[4]))
model = tvq.load()
if sys.argv[5] != "default":
    model = dataclasses.replace(model, algorithm=sys.argv[5])
prompt = model.tokenizer.encode("To be, or not to be, that is the question:")
ids = np.random.default_rng(0).integers(3, model.config.n_vocab, score_tokens)
def decode():
    r = generate(model, prompt, max_tokens=tokens, sampler=sampler,
                 ignore_eos=True)
    return r.generated_tokens / r.generate_seconds
def score():
    start = time.perf_counter()
    result, _ = score_ids(model, ids)
    return score_tokens / (time.perf_counter() - start)
decode(); score()
print(json.dumps({"decode": statistics.median(decode() for _ in range(3)),
                  "score": statistics.median(score() for _ in range(3))}))
"""


def measure(tree: Path, args: argparse.Namespace, cache: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_COMPILATION_CACHE_DIR=cache)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(args.tokens), str(args.score_tokens),
         str(args.temperature), str(args.top_p), args.algorithm],
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
    args = parser.parse_args()
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
    print(f"{'':24}{'decode tok/s':>14}{'score tok/s':>14}")
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(r[k] for r in runs) for k in ("decode", "score")}
        print(f"{name:24}{medians[name]['decode']:>14.0f}{medians[name]['score']:>14.0f}")
    new, old = medians["working tree"], medians[args.rev]
    print(f"{'ratio (working / ' + args.rev[:10] + ')':24}{new['decode'] / old['decode']:>14.3f}"
          f"{new['score'] / old['score']:>14.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
