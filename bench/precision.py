"""bfloat16 against float32: per-token log-probs and bits per byte of the same model.

    python bench/precision.py FILE ... [--model DIR]

Each file is scored twice in the CLI's streaming path (full context, one pass), with the
model's float32 compute and with `Model.with_dtype("bfloat16")` (matrix products in
bfloat16, sums, softmax, normalisation and state in float32). Prints, per file and in
total, the mean and largest |Δ log-prob| per token and the change in bits per byte.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.scoring.stream import score_stream  # noqa: E402


def per_token(model, path: Path) -> tuple[np.ndarray, float, float]:
    """(log-probs of every token, bits per byte, seconds)."""
    kept = []
    start = time.perf_counter()

    def keep(ids, log_probs, offset):
        kept.append(np.asarray(log_probs))

    with path.open("rb") as f:
        result, _ = score_stream(model, f, path.name, on_tokens=keep)
    return np.concatenate(kept), result.row()["bits_per_byte"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    f32 = tvq.load(args.model)
    bf16 = f32.with_dtype("bfloat16")
    print(f"# precision: {machine()}")
    print("file  tokens  bpb_float32  bpb_bfloat16  delta_bpb  mean_abs_dlogprob  "
          "max_abs_dlogprob  s_float32  s_bfloat16")  # fmt: skip
    diffs, totals = [], []
    for path in args.files:
        a, bpb_a, s_a = per_token(f32, path)
        b, bpb_b, s_b = per_token(bf16, path)
        d = np.abs(a - b)
        diffs.append(d)
        totals.append((bpb_a, bpb_b, path.stat().st_size))
        print(f"{path.name}  {len(a)}  {bpb_a:.5f}  {bpb_b:.5f}  {bpb_b - bpb_a:+.5f}  "
              f"{d.mean():.5f}  {d.max():.4f}  {s_a:.1f}  {s_b:.1f}", flush=True)  # fmt: skip
    d = np.concatenate(diffs)
    size = sum(t[2] for t in totals)
    bpb_a = sum(t[0] * t[2] for t in totals) / size
    bpb_b = sum(t[1] * t[2] for t in totals) / size
    print(
        f"TOTAL  {len(d)}  {bpb_a:.5f}  {bpb_b:.5f}  {bpb_b - bpb_a:+.5f}  {d.mean():.5f}  "
        f"{d.max():.4f}  -  -  (99.9th percentile |Δ|: {np.percentile(d, 99.9):.4f})"
    )


if __name__ == "__main__":
    main()
