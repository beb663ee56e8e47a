"""The two forms of the network side by side: the sublayers unrolled (a copy of the
sublayer per sublayer in every compiled program) against one scan over stacked
parameters (docs/DESIGN.md section 5), on the same model, in one run.

    python bench/depth_forms.py [--rounds 3] [--tokens 100] [--score-tokens 8192]
                                [--model DIR]

Each round runs one fresh process per form, alternating, so drift of the machine hits
both alike; a process sets tvq.nn.layout.UNROLLED_MAX (0: every network scans; 10**6:
none does), loads the model (the built-in one unless --model), warms up, then times
greedy decoding at batch 1 (tokens/s), scoring (tokens/s) and one step of the default
training recipe (tokens/s), median of 3. This is what chose layout.UNROLLED_MAX: the
form that is faster for a network of that many sublayers on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FORMS = {"unrolled": 10**6, "scanned": 0}


def child(args: argparse.Namespace) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import tvq
    from tvq.nn import layout

    layout.UNROLLED_MAX = args.unrolled_max
    from tvq.train import TrainSettings, make_optimizer, make_train_step

    model = tvq.load(args.model)
    prompt = model.tokenizer.encode("To be, or not to be, that is the question:")
    ids = np.random.default_rng(0).integers(3, model.config.n_vocab, args.score_tokens)
    settings = TrainSettings()
    rows, length = settings.batch_size, settings.update_len
    data = np.random.default_rng(1).integers(3, model.config.n_vocab, (rows, length + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    optimizer = make_optimizer(settings)
    step = make_train_step(model.config, settings, optimizer, model.algorithm)
    params = jax.tree_util.tree_map(jnp.copy, model.params)
    carry = [params, optimizer.init(params)]

    def decode() -> float:
        r = tvq.generate(model, prompt, max_tokens=args.tokens,
                         sampler=tvq.Sampler(temperature=0.0), ignore_eos=True)  # fmt: skip
        return r.generated_tokens / r.generate_seconds

    def score() -> float:
        start = time.perf_counter()
        tvq.score_ids(model, ids)
        return len(ids) / (time.perf_counter() - start)

    def train() -> float:
        start = time.perf_counter()
        params, opt, _, metrics = step(*carry, model.initial_state(rows), inputs, targets)
        jax.block_until_ready(metrics)
        carry[:] = params, opt
        return rows * length / (time.perf_counter() - start)

    rates = {"decode": decode, "score": score, "train": train}
    for rate in rates.values():
        rate()
    return {name: statistics.median(rate() for _ in range(3)) for name, rate in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--score-tokens", type=int, default=8192)
    parser.add_argument("--model", default=None)
    parser.add_argument("--unrolled-max", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unrolled_max is not None:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {form: [] for form in FORMS}
    for n in range(args.rounds):
        for form, unrolled_max in FORMS.items():
            cmd = [
                sys.executable,
                __file__,
                "--unrolled-max",
                str(unrolled_max),
                "--tokens",
                str(args.tokens),
                "--score-tokens",
                str(args.score_tokens),
            ]
            if args.model:
                cmd += ["--model", args.model]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"{form} failed:\n{done.stderr[-3000:]}")
            runs[form].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {n + 1} {form}: {runs[form][-1]}", file=sys.stderr, flush=True)
    print(f"# depth_forms: {machine()}; {args.rounds} rounds, alternating; model "
          f"{args.model or 'built-in'}; greedy decoding of {args.tokens} tokens, scoring "
          f"{args.score_tokens} tokens, one training step of the default recipe")  # fmt: skip
    names = ("decode", "score", "train")
    print(f"{'':<26}" + "".join(f"{n + ' tok/s':>14}" for n in names))
    medians = {f: {n: statistics.median(r[n] for r in runs[f]) for n in names} for f in FORMS}
    for form in FORMS:
        print(f"{form:<26}" + "".join(f"{medians[form][n]:>14.0f}" for n in names))
    print(
        f"{'ratio (scanned/unrolled)':<26}"
        + "".join(f"{medians['scanned'][n] / medians['unrolled'][n]:>14.3f}" for n in names)
    )


if __name__ == "__main__":
    main()
