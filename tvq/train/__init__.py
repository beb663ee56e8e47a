"""Training (docs/DESIGN.md section 11): settings, data, the step, the resumable loop, and
`train_from_files`, from text files to a model directory."""

from tvq.train.files import train_from_files
from tvq.train.loop import Progress, RunState, evaluate, run_training
from tvq.train.settings import TrainSettings
from tvq.train.step import StepMetrics, make_optimizer, make_train_step

__all__ = [
    "Progress",
    "RunState",
    "StepMetrics",
    "TrainSettings",
    "evaluate",
    "make_optimizer",
    "make_train_step",
    "run_training",
    "train_from_files",
]
