"""Decoding speed in tokens per second for each sampler, at batch 1 and batch 8.

    python bench/decode_speed.py [--model DIR] [--tokens 400] [--batches 1 8] [--repeats 5]
                                 [--dtypes float32 bfloat16]

`generate` (the path `tvq generate` takes) continues a short prompt with greedy
decoding, temperature 1, and the CLI's default sampler (temperature 0.8, top-p 0.95).
Rounds interleave the samplers, batches and compute dtypes (`--dtypes`, as `tvq generate
--dtype`), so drift of the machine hits them all
alike; each number is the median over rounds after a compiling round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.decoding import generate  # noqa: E402
from tvq.runtime.model import DTYPES  # noqa: E402
from tvq.text.sampling import Sampler  # noqa: E402

SAMPLERS = {
    "greedy": Sampler(temperature=0),
    "temperature 1": Sampler(temperature=1.0),
    "CLI default (t 0.8, top-p 0.95)": Sampler(temperature=0.8, top_p=0.95),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=DTYPES)
    args = parser.parse_args()
    base = tvq.load(args.model)
    models = {dtype: base.with_dtype(dtype) for dtype in args.dtypes}
    prompt = base.tokenizer.encode("To be, or not to be, that is the question:")
    print(f"# decode_speed: {machine()}; {args.tokens} tokens per timing")
    rates: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.repeats + 1):
        for dtype, model in models.items():
            for name, sampler in SAMPLERS.items():
                for batch in args.batches:
                    result = generate(model, prompt, max_tokens=args.tokens, sampler=sampler,
                                      seed=r, num_samples=batch)  # fmt: skip
                    if r:  # round 0 compiles and warms up
                        rate = result.generated_tokens / result.generate_seconds
                        rates.setdefault((dtype, name, batch), []).append(rate)
    width = max(map(len, SAMPLERS))
    for dtype in models:
        header = "".join(f"  batch {b} tok/s" for b in args.batches)
        print(f"{'sampler, ' + dtype:{width}}{header}")
        for name in SAMPLERS:
            cells = "".join(
                f"  {statistics.median(rates[dtype, name, b]):>13.0f}" for b in args.batches
            )
            print(f"{name:{width}}{cells}")


if __name__ == "__main__":
    main()
