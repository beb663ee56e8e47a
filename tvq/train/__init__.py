"""Training (docs/DESIGN.md section 11): settings, the step, the resumable loop, and
`train_from_files` (run.py), from text files to a model directory; the data comes from
tvq.corpus.

Names load on first use (PEP 562): `tvq.train.settings` alone does not import JAX.
"""

from __future__ import annotations

from tvq import lazy_exports

_EXPORTS = {
    "train_from_files": "tvq.train.run",
    "Progress": "tvq.train.loop",
    "RunState": "tvq.train.checkpoints",
    "evaluate": "tvq.train.loop",
    "run_training": "tvq.train.loop",
    "TrainSettings": "tvq.train.settings",
    "StepMetrics": "tvq.train.step",
    "make_optimizer": "tvq.train.step",
    "make_train_step": "tvq.train.step",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
