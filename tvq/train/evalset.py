"""The held-out documents a run evaluates on (docs/DESIGN.md section 11).

Without a bound, every held-out document, whole. With `eval_tokens` N, documents in an
order drawn once from the run's seed, each whole while it fits in what is left of N
tokens, the first that does not fit cut to it; so every evaluation of the run scores the
same tokens, at most N. The choice is written to <out>/train/eval_documents.json when the
run starts and read back when it resumes, so a resumed run scores what the first one
chose even if the chooser changes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tvq.distributed import cluster
from tvq.errors import TrainingError
from tvq.files.atomic import write_atomically

EVAL_FILE = "eval_documents.json"

Document = tuple[Sequence[int], int]  # (token ids, UTF-8 bytes)


def choose(documents: Sequence[Document], eval_tokens: int, seed: int, tokenizer: Any):
    """[(document index, tokens, bytes)]: the documents (or the first part of the last)
    that an evaluation bounded to eval_tokens scores."""
    chosen, left = [], eval_tokens
    for index in np.random.default_rng(seed).permutation(len(documents)):
        ids, size = documents[int(index)]
        if len(ids) >= left:  # the last one: whole if it fits exactly, else its first part
            cut = size if len(ids) == left else sum(
                len(tokenizer.token_bytes(int(i))) for i in ids[:left])  # fmt: skip
            chosen.append((int(index), left, int(cut)))
            break
        chosen.append((int(index), len(ids), int(size)))
        left -= len(ids)
    return chosen


def eval_documents(
    documents: Sequence[Document], eval_tokens: int | None, seed: int, tokenizer: Any,
    train_dir: Path,
) -> Sequence[Document]:  # fmt: skip
    """The documents every evaluation of this run scores: all of them without a bound,
    else the recorded choice (made and recorded by process 0 on the run's first start)."""
    if eval_tokens is None or not documents:
        return documents
    path = train_dir / EVAL_FILE
    if not path.exists() and cluster.is_main():
        record = {"eval_tokens": eval_tokens, "seed": seed,
                  "documents": choose(documents, eval_tokens, seed, tokenizer)}  # fmt: skip
        text = json.dumps(record, indent=1).encode()
        write_atomically(path, lambda f: f.write(text))
    cluster.barrier("eval-documents")
    try:
        chosen = json.loads(path.read_text())["documents"]
        picked = [(documents[index][0][:tokens], size) for index, tokens, size in chosen]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise TrainingError(f"{path} is corrupt; use another --out") from None
    return picked
