"""Do samples use real words? The fraction of generated words found in the training text.

    python bench/sample_words.py TRAIN_FILE_OR_DIR ... [--model DIR] [--samples 8]

Generates `--samples` texts of `--max-tokens` tokens from each of a few prompts with the
CLI's default sampler (temperature 0.8, top-p 0.95; seeds 0, 1, ...), splits them into
words (letters, with inner apostrophes or hyphens; case folded) and counts how many
occur in the training files' words. Prints the fraction, the invented words seen most
often, and the first sample.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.corpus.sources import find_files  # noqa: E402
from tvq.decoding import generate  # noqa: E402
from tvq.text.sampling import Sampler  # noqa: E402

WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
PROMPTS = ["To be, or not", "ROMEO.\n", "Enter the King and Queen.\n\nKING.\n",
           "Of Man's first disobedience"]  # fmt: skip


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train", nargs="+")
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    vocabulary = set()
    for path in find_files(args.train):
        vocabulary.update(words(path.read_text("utf-8", errors="replace")))
    model = tvq.load(args.model)
    sampler = Sampler(temperature=0.8, top_p=0.95)  # the CLI's defaults (tvq generate)
    found, invented, first = 0, collections.Counter(), None
    total = 0
    for prompt in PROMPTS:
        result = generate(model, model.tokenizer.encode(prompt), max_tokens=args.max_tokens,
                          sampler=sampler, seed=0, num_samples=args.samples)  # fmt: skip
        for sample in result.samples:
            first = first or prompt + sample.text
            for word in words(sample.text):
                total += 1
                if word in vocabulary:
                    found += 1
                else:
                    invented[word] += 1
    print(f"# sample_words: {machine()}; {len(vocabulary)} distinct training words")
    print(
        f"{len(PROMPTS)} prompts x {args.samples} samples x {args.max_tokens} tokens: "
        f"{total} words, {found / max(total, 1):.1%} found in the training text"
    )
    print("invented:", ", ".join(f"{w} ({n})" for w, n in invented.most_common(15)))
    print("--- first sample ---")
    print(first)


if __name__ == "__main__":
    main()
