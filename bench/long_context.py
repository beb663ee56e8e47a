"""How much the aggregate cache helps: the same parameters with it on and off, by position.

    python bench/long_context.py FILE ... [--model DIR] [--json]

Each file is scored once in the CLI's streaming path (full context) with the model as
the main model and the same parameters without the aggregate cache (window attention
only) as the baseline, token by token in one pass (`tvq score --baseline-no-agg-cache
--by-position`). Prints the TOTAL curve per position bucket, then the summary that issue
15 asks for: mean NLL (nats/token) of positions 0-512 with the cache on, and of
positions from 8,192 on, on and off, and the gain (off − on). With --json, only that
summary, as one JSON object (what scripts/train_gpu.py reads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.scoring.stats import FileScore, bucket_bounds  # noqa: E402
from tvq.scoring.stream import score_stream  # noqa: E402

FAR = 8192  # "beyond 8k": the position buckets from here on
NEAR = 512  # the first positions, with little context


def mean_nll(cells: list[list[float]], lo: int, hi: float) -> tuple[float, int]:
    """Mean NLL and token count over the position buckets inside [lo, hi)."""
    tokens = nll = 0.0
    for index, (n, total, _) in enumerate(cells):
        start, end = bucket_bounds(index)
        if start >= lo and end <= hi:
            tokens, nll = tokens + n, nll + total
    return (nll / tokens if tokens else float("nan")), int(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = parser.parse_args()
    for path in args.files:
        if not path.is_file():
            parser.error(f"{path} is not a file")
    model = tvq.load(args.model)
    window_only = model.with_agg_cache(False)
    scores = []
    for path in args.files:
        with path.open("rb") as f:
            score, _ = score_stream(model, f, path.name, by_position=True,
                                    baseline=window_only)  # fmt: skip
        scores.append(score)
    total = FileScore.total(scores)
    near, n_near = mean_nll(total.by_position, 0, NEAR)
    far_on, n_far = mean_nll(total.by_position, FAR, float("inf"))
    far_off, _ = mean_nll(total.baseline_by_position, FAR, float("inf"))
    bpb_on = total.row()["bits_per_byte"]
    if args.json:  # NaN (no token that far) as null, so any JSON reader takes it
        summary = dict(
            bits_per_byte=bpb_on, near_tokens=n_near, near_nll=near, far_tokens=n_far,
            far_nll_on=far_on, far_nll_off=far_off, gain=far_off - far_on,
            far_minus_near=far_on - near,
        )  # fmt: skip
        print(json.dumps({k: None if v != v else v for k, v in summary.items()}))
        return
    print(f"# long_context: {machine()}; {model.metadata.get('corpus', 'model')}")
    print("positions  tokens  nll_on  nll_off  gain")
    curves = zip(total.by_position, total.baseline_by_position, strict=True)
    for index, (on, off) in enumerate(curves):
        start, end = bucket_bounds(index)
        print(f"{start}-{end}  {int(on[0])}  {on[1] / on[0]:.4f}  {off[1] / off[0]:.4f}  "
              f"{(off[1] - on[1]) / on[0]:+.4f}")  # fmt: skip
    print(f"TOTAL bits per byte: on {bpb_on:.4f}")
    print(f"first {NEAR} positions ({n_near} tokens): nll {near:.4f}")
    print(
        f"positions >= {FAR} ({n_far} tokens): nll on {far_on:.4f}, off {far_off:.4f}, "
        f"gain {far_off - far_on:+.4f} nats/token; on - first {NEAR}: {far_on - near:+.4f}"
    )


if __name__ == "__main__":
    main()
