"""Training (docs/DESIGN.md section 11): settings, the step, the resumable loop, and
`train_from_files` (run.py), from text files to a model directory; the data comes from
tvq.corpus.

Names load on first use (PEP 562): `tvq.train.settings` alone does not import JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvq import lazy_exports

_EXPORTS = {
    "train_from_files": "tvq.train.run",
    "Progress": "tvq.train.loop",
    "RunState": "tvq.train.loop",
    "evaluate": "tvq.train.loop",
    "run_training": "tvq.train.loop",
    "TrainSettings": "tvq.train.settings",
    "StepMetrics": "tvq.train.step",
    "make_optimizer": "tvq.train.step",
    "make_train_step": "tvq.train.step",
}
__all__ = [
    "Progress", "RunState", "StepMetrics", "TrainSettings", "evaluate", "make_optimizer",
    "make_train_step", "run_training", "train_from_files",
]  # fmt: skip

if TYPE_CHECKING:
    from tvq.train.loop import Progress, RunState, evaluate, run_training
    from tvq.train.run import train_from_files
    from tvq.train.settings import TrainSettings
    from tvq.train.step import StepMetrics, make_optimizer, make_train_step


__getattr__ = lazy_exports(__name__, _EXPORTS)
