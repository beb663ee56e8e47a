"""The two forms of the network side by side: the sublayers unrolled (a copy of the
sublayer per sublayer in every compiled program) against one scan over stacked
parameters (docs/DESIGN.md section 5), on the same model, in one run.

    python bench/depth_forms.py [--rounds 3] [--tokens 100] [--score-tokens 8192]

Each round runs one fresh process per form, alternating, so drift of the machine hits
both alike; a process sets tvq.nn.layout.UNROLLED_MAX (0: every network scans; 10**6:
none does), then runs bench/revisions.py's probe on the built-in model: greedy decoding
at batch 1, scoring and one step of the default training recipe (tokens/s), median of 3
after a warm-up. This is what chose layout.UNROLLED_MAX: the
form that is faster for a network of that many sublayers on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from revisions import PROBE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FORMS = {"unrolled": 10**6, "scanned": 0}


def child(unrolled_max: int, args: argparse.Namespace) -> dict[str, float]:
    """One process, one form: bench/revisions.py's probe (the same measurements) with
    tvq.nn.layout.UNROLLED_MAX set first."""
    settings = dict(tokens=args.tokens, score_tokens=args.score_tokens, temperature=0.0,
                    top_p=1.0, algorithm="default", train=True)  # fmt: skip
    code = f"import tvq.nn.layout as layout\nlayout.UNROLLED_MAX = {unrolled_max}\n" + PROBE
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"unrolled_max {unrolled_max} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--score-tokens", type=int, default=8192)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {form: [] for form in FORMS}
    for n in range(args.rounds):
        for form, unrolled_max in FORMS.items():
            runs[form].append(child(unrolled_max, args))
            print(f"  round {n + 1} {form}: {runs[form][-1]}", file=sys.stderr, flush=True)
    print(f"# depth_forms: {machine()}; {args.rounds} rounds, alternating; model "
          f"built-in; greedy decoding of {args.tokens} tokens, scoring "
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
