"""Per-token decoding cost at different context positions: it must be flat.

    python bench/decode_flat.py [--model DIR] [--positions 200 20000] [--tokens 200]

For each position P the model first reads P tokens (scoring, not timed), then
`generate` (the path `tvq generate` takes: compiled chunks, host-side text) samples
--tokens tokens at temperature 1; ms/token is the median of several repeats, rounds
interleaving the positions, all in this one run; the ratio to the first position is
printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.decoding import generate  # noqa: E402
from tvq.runtime.context import score_ids  # noqa: E402
from tvq.text.sampling import Sampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--positions", type=int, nargs="+", default=[200, 2000, 20000])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model = tvq.load(args.model)
    rng = np.random.default_rng(0)
    sampler = Sampler(temperature=1.0)
    print(f"# decode_flat: {machine()}; batch {args.batch}; {args.tokens} tokens per timing")
    print("position  ms/step  tokens/s  ratio")
    contexts = {}
    for position in args.positions:
        ids = rng.integers(3, model.config.n_vocab, size=position)
        contexts[position] = score_ids(model, ids)[1]
    times: dict[int, list[float]] = {p: [] for p in args.positions}
    # Rounds interleave the positions, so drift of the machine hits them all alike.
    for r in range(args.repeats + 1):
        for position in args.positions:
            result = generate(model, [], max_tokens=args.tokens, sampler=sampler, seed=r,
                              num_samples=args.batch, context=contexts[position])  # fmt: skip
            steps = result.generated_tokens // args.batch  # fewer if every row sampled EOS
            if r:  # round 0 compiles and warms up
                times[position].append(result.generate_seconds / steps)
    base = None
    for position in args.positions:
        ms = 1000 * float(np.median(times[position]))
        base = base or ms
        print(f"{position:>8}  {ms:8.3f}  {args.batch * 1000 / ms:8.0f}  {ms / base:5.3f}")


if __name__ == "__main__":
    main()
