"""Copies a trained model into the package as the built-in default and records a check value.

    python scripts/ship_default.py runs/default/model

The check value is the bits per byte on tests/data/hamlet_head.txt (the first 4000 bytes
of the held-out hamlet_gut.txt), which tests/test_default_model.py recomputes.
"""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import tvq
from tvq.scoring.stream import score_stream

ROOT = Path(__file__).resolve().parent.parent
# Inference block length: the fastest in `python bench/mfu.py` on the development machine
# (bench/RESULTS.md); results do not depend on it (docs/DESIGN.md invariant 3).
BLOCK_LEN = 256
SAMPLE = ROOT / "tests" / "data" / "hamlet_head.txt"


def main(source: str) -> None:
    model = tvq.load(source).with_block_len(BLOCK_LEN)
    with SAMPLE.open("rb") as f:
        result, _ = score_stream(model, f, SAMPLE.name)
    dest = ROOT / "tvq" / "models" / "default"
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    check = {
        "file": "tests/data/hamlet_head.txt",
        "bits_per_byte": round(result.row()["bits_per_byte"], 6),
    }
    model = dataclasses.replace(model, metadata={**model.metadata, "sample_check": check})
    model.save(dest)
    shutil.copyfile(dest / "tokenizer.model", ROOT / "tokenizers" / "shakespeare-4k.model")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"shipped": str(dest), "bytes": size, **model.metadata["sample_check"]}))


if __name__ == "__main__":
    main(sys.argv[1])
