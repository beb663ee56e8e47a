"""A run's logs (docs/DESIGN.md section 11): <out>/train/metrics.jsonl always, and on
request TensorBoard event files (tensorboardX) and Weights & Biases (wandb), written by
process 0 alone. Each step logs its record and each evaluation its own; the JSON lines
keep their names, the other two name the same figures as charts (`TAGS`).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from tvq.errors import TrainingError
from tvq.files.atomic import write_atomically

METRICS_FILE = "metrics.jsonl"
WANDB_FILE = "wandb.json"  # <out>/train: the W&B run's id, so that a resumed run continues it
# metrics.jsonl's names → the charts of TensorBoard and W&B
TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "tokens_per_second": "train/tokens_per_second",
    "mfu": "train/mfu",
    "grad_norm": "train/grad_norm",
    "memory_bytes": "train/memory_bytes",
    "val_loss": "eval/loss",
    "val_bits_per_byte": "eval/bits_per_byte",
}


class MetricsLog:
    """<out>/train/metrics.jsonl: one JSON object per step (step, loss, lr, tokens,
    tokens_per_second, mfu, grad_norm) and per evaluation (step, val_loss,
    val_bits_per_byte), flushed as written. A resumed run first drops the records past its
    checkpoint: those steps run again, so each step appears once."""

    def __init__(self, path: Path, resume_step: int) -> None:
        kept = []
        self.kept: list[dict] = []  # the records kept, for the logs that replay them
        try:
            if path.exists():
                for line in path.read_text(errors="replace").splitlines():
                    try:
                        step = json.loads(line).get("step")
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    if isinstance(step, int) and step <= resume_step:
                        kept.append(line + "\n")
                        self.kept.append(json.loads(line))
            write_atomically(path, lambda f: f.write("".join(kept).encode()))
            self.file = path.open("a", encoding="utf-8")
        except OSError as e:
            raise TrainingError(f"{path} cannot be written: {e.strerror}") from None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLog:
    """TensorBoard event files in `folder`. A resumed run purges everything the runs
    before it logged (tensorboardX's purge_step 1) and logs again the records of
    metrics.jsonl up to its checkpoint: a run killed with kill -9 may have lost the last
    events its writer had not yet written, which metrics.jsonl (flushed per line) kept,
    so each step appears once, with its values."""

    def __init__(self, folder: Path, resume_step: int, kept: list[dict]) -> None:
        tensorboardx = _optional("tensorboardX", "--log-dir")
        purge = {"purge_step": 1} if resume_step else {}
        self.writer = tensorboardx.SummaryWriter(str(folder), **purge)
        for record in kept:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name in TAGS and value is not None:
                self.writer.add_scalar(TAGS[name], value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A Weights & Biases run in `project` (offline too: WANDB_MODE=offline), its files
    under <out>/train; a resumed run continues the W&B run it started (its id is kept in
    <out>/train/wandb.json)."""

    def __init__(self, project: str, train_dir: Path, config: dict[str, Any]) -> None:
        wandb = _optional("wandb", "--wandb")
        id_file = train_dir / WANDB_FILE
        try:
            run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else None
        except (OSError, ValueError, KeyError, TypeError):
            run_id = None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B's ids: letters and digits
            text = json.dumps({"id": run_id}).encode()
            write_atomically(id_file, lambda f: f.write(text))
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(train_dir),
                              config=config)  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        values = {TAGS[n]: v for n, v in record.items() if n in TAGS and v is not None}
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Logs:
    """Every log a run writes, written together; none in a process other than 0."""

    def __init__(self, logs: list) -> None:
        self.logs = logs

    def write(self, **record: Any) -> None:
        for log in self.logs:
            log.write(record)

    def close(self) -> None:
        for log in self.logs:
            log.close()


def open_logs(
    train_dir: Path, resume_step: int, log_dir: Path | None, wandb_project: str | None,
    config: dict[str, Any], main: bool = True,
) -> Logs:  # fmt: skip
    """The run's logs: metrics.jsonl, and TensorBoard in log_dir, and W&B in wandb_project
    when given; nothing written when `main` is false (a process other than 0)."""
    if not main:
        return Logs([])
    metrics = MetricsLog(train_dir / METRICS_FILE, resume_step)
    logs = [metrics]
    try:
        if log_dir is not None:
            logs.append(TensorBoardLog(Path(log_dir), resume_step, metrics.kept))
        if wandb_project is not None:
            logs.append(WandbLog(wandb_project, train_dir, config))
    except BaseException:
        Logs(logs).close()
        raise
    return Logs(logs)


def check_loggers(log_dir: Path | None, wandb_project: str | None) -> None:
    """TrainingError naming the pip install to run when a log asked for has no package."""
    if log_dir is not None:
        _optional("tensorboardX", "--log-dir")
    if wandb_project is not None:
        _optional("wandb", "--wandb")


def _optional(module: str, option: str) -> Any:
    """The module of an optional log (the extras logs and wandb of pyproject.toml)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrainingError(f"{option} needs the {module} package: pip install {module}") from None
