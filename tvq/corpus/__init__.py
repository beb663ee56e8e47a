"""The corpus (docs/DESIGN.md section 11): text files tokenized once into memory-mapped
token shards that every training run reads. Its files name the stages a corpus goes
through:

    sources.py   the input files, their kinds, their documents, the held-out choice
    jsonl.py     a JSONL line too long to hold, parsed streaming
    workers.py   what a worker process does: scan and tokenize a unit of work
    pool.py      the worker processes and their progress
    shards.py    the prepared dataset's format on disk, written and read (PreparedData)
    reader.py    the token stream as the training loop reads it (TokenStream)

and `prepare.py` drives them (`prepare.request(inputs, ...)` finds and checks the inputs,
`prepare.prepare(request)` finds the dataset in the cache or builds it and publishes it),
with `build.py` holding one build's phases and `sample.py` the tokenizer's sample. Names
load on first use (PEP 562): importing the package does not import numpy, and a worker
process imports only what it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvq import lazy_exports

DEFAULT_VOCAB_SIZE = 4096  # pieces of a tokenizer trained for the corpus
DEFAULT_VAL_FRACTION = 0.05  # documents held out when no --val file is named

_EXPORTS = {
    "PrepareEvent": "tvq.corpus.build",
    "TokenShards": "tvq.corpus.reader",
    "TokenStream": "tvq.corpus.reader",
    "PreparedData": "tvq.corpus.shards",
    "is_prepared": "tvq.corpus.shards",
    "find_sources": "tvq.corpus.sources",
}
__all__ = [
    "DEFAULT_VAL_FRACTION", "DEFAULT_VOCAB_SIZE", "PrepareEvent", "PreparedData",
    "TokenShards", "TokenStream", "find_sources", "is_prepared",
]  # fmt: skip

if TYPE_CHECKING:
    from tvq.corpus.build import PrepareEvent
    from tvq.corpus.reader import TokenShards, TokenStream
    from tvq.corpus.shards import PreparedData, is_prepared
    from tvq.corpus.sources import find_sources


__getattr__ = lazy_exports(__name__, _EXPORTS)
