"""What lets a training run resume (docs/DESIGN.md section 11): run.json, which says what
the run is, and the orbax checkpoints of its RunState, under <out>/train.

A run keeps one layout from its first step to its last, the step's (tvq/train/step.py):
where the network scans its sublayers (tvq.nn.layout.scanned), the scanned tree, its
optimiser state and a stacked AttentionState, so that the step donates them and nothing
is converted between steps. Files keep the reference layout whatever the depth (the
reference tree, its optimiser state and a ModelState: what a model directory and a
state file hold). `to_run_layout` and `to_file_layout` convert between the two, here,
where checkpoints are written and read (MaxText keeps its scanned parameters throughout
and converts in its checkpoint conversion).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax.struct
import jax

from tvq.config import ModelConfig
from tvq.distributed import cluster
from tvq.errors import TrainingError
from tvq.files.atomic import write_atomically
from tvq.nn.layout import scanned, stack_within, unstack_within
from tvq.nn.state import AttentionState, ModelState, stack_state, unstack_state
from tvq.train.settings import TrainSettings

TRAIN_DIR = "train"  # <out>/train: run.json, the checkpoints, the training log
RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"
# Settings that change memory, never the numbers: a run may resume with others.
MEMORY_SETTINGS = ("grad_accum", "remat")
# Settings of what the run keeps and writes at the end, never of its numbers.
OUTPUT_SETTINGS = ("keep", "export")


@flax.struct.dataclass
class RunState:
    """Everything a checkpoint holds."""

    params: Any
    opt_state: Any
    attn_state: ModelState | AttentionState  # carried from window to window, per batch row
    step: jax.Array  # [] int32: updates done
    tokens_seen: jax.Array  # [] float32
    ema: Any = None  # the parameters' moving average, float32 (tvq/train/average.py), or None


def to_run_layout(tree: Any, config: ModelConfig) -> Any:
    """Every parameter tree and attention state inside `tree` (a RunState; parameters,
    an optimiser state, a ModelState) in the run's layout: stacked where config's network
    scans its sublayers, else the files' layout. Exact: values are only moved."""
    if not scanned(2 * config.n_layer):
        return to_file_layout(tree)
    stacked = jax.tree_util.tree_map(
        lambda x: stack_state(x) if isinstance(x, ModelState) else x, tree, is_leaf=_is_state
    )
    return stack_within(stacked)


def to_file_layout(tree: Any) -> Any:
    """The inverse of to_run_layout: the reference tree and a ModelState, as checkpoints,
    model directories and state files hold them."""
    unstacked = jax.tree_util.tree_map(
        lambda x: unstack_state(x) if isinstance(x, AttentionState) else x, tree,
        is_leaf=_is_state,
    )  # fmt: skip
    return unstack_within(unstacked)


def _is_state(x: Any) -> bool:
    return isinstance(x, ModelState | AttentionState)


class Checkpoints:
    """The orbax checkpoints of a run (<out>/train/checkpoints), in the files' layout.
    Every process of a cluster saves and restores together.

    Which are kept (settings.keep): the latest N, or with "best" the one of the lowest
    held-out bits per byte and the latest (what a resumed run needs). A checkpoint
    written at an evaluation records its figures (orbax's metrics), so the best is known
    from the checkpoints alone when a run resumes."""

    def __init__(self, train_dir: Path, keep: str = "2") -> None:
        import orbax.checkpoint as ocp
        from orbax.checkpoint.checkpoint_managers import preservation_policy as policy

        self.folder = train_dir / CHECKPOINTS_DIR
        self.by_score = keep == "best"
        if self.by_score:
            score = _score
            lowest = policy.BestN(get_metric_fn=score, reverse=True, n=1)  # reversed: lowest
            options = ocp.CheckpointManagerOptions(
                create=True, best_fn=score, best_mode="min",
                preservation_policy=policy.AnyPreservationPolicy([policy.LatestN(n=1), lowest]),
            )  # fmt: skip
        else:
            count = 1 if keep == "last" else int(keep)
            options = ocp.CheckpointManagerOptions(
                create=True, preservation_policy=policy.LatestN(n=count)
            )
        self.manager = ocp.CheckpointManager(self.folder.absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best(self) -> tuple[int, dict[str, float]] | None:
        """With keep "best": (the step, its evaluation) of the lowest held-out bits per
        byte among the checkpoints, or None when none was evaluated."""
        if not self.by_score:
            return None
        step = self.manager.best_step()
        figures = self.manager.metrics(step) if step is not None else None
        if not figures or "bits_per_byte" not in figures:
            return None
        return step, {name: value for name, value in figures.items() if name != "step"}

    def restore(self, template: RunState, step: int | None = None) -> RunState:
        """Checkpoint `step` (None: the latest) with template's structure, dtypes and
        shardings (the files' layout), or template itself when there is none."""
        import orbax.checkpoint as ocp

        step = self.latest() if step is None else step
        if step is None:
            return template
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many kinds; all mean "unreadable"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrainingError(
                f"checkpoint {step} in {self.folder} cannot be restored "
                f"({first}); remove it to resume from an earlier one"
            ) from None

    def save(self, step: int, run: RunState, evaluation: dict[str, float] | None = None) -> None:
        """Writes run (in the run's layout) as checkpoint `step`, in the files' layout, and
        waits for it; nothing when that checkpoint exists (Ctrl-C just after a save).
        evaluation: the held-out figures at this step, recorded with it (keep "best")."""
        import orbax.checkpoint as ocp

        if self.latest() == step:
            return
        # with keep "best" every checkpoint records figures (orbax warns of one without)
        metrics = dict(evaluation or {}, step=step) if self.by_score else None
        self.manager.save(step, args=ocp.args.StandardSave(to_file_layout(run)), force=True,
                          metrics=metrics)  # fmt: skip
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _score(figures: dict[str, Any]) -> float:
    """A checkpoint's rank with keep "best": its held-out bits per byte (inf: none)."""
    return float(figures.get("bits_per_byte", math.inf))


def open_run_dir(
    out: Path, config: ModelConfig, settings: TrainSettings, tokenizer: Any, data_tokens: int
) -> Path:
    """<out>/train, created, with its run.json: written by process 0 for a new run,
    checked by every process against a run there (TrainingError unless it is this run:
    the same architecture, settings, tokenizer and amount of data; the memory settings
    and what is kept and exported may change)."""
    train_dir = out / TRAIN_DIR
    try:
        train_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{train_dir} cannot be created: {e.strerror}") from None
    run_file = train_dir / RUN_FILE
    run_doc = {
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "tokenizer": tokenizer.fingerprint,
        "data_tokens": int(data_tokens),
    }
    if run_file.exists():  # every process checks; process 0 writes it after the barrier
        _check_same_run(run_file, run_doc, out)
    cluster.barrier("run-checked")
    if not run_file.exists() and cluster.is_main():
        text = json.dumps(run_doc, indent=2, sort_keys=True).encode()
        write_atomically(run_file, lambda f: f.write(text))
    return train_dir


def _check_same_run(run_file: Path, run_doc: dict[str, Any], out: Path) -> None:
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TrainingError(f"{run_file} is corrupt; use another --out") from None
    if not isinstance(previous, dict):
        raise TrainingError(f"{run_file} is corrupt; use another --out")
    if isinstance(previous.get("settings"), dict):
        defaults = dataclasses.asdict(TrainSettings())  # settings added since, at defaults
        free = MEMORY_SETTINGS + OUTPUT_SETTINGS  # may change
        memory = {name: run_doc["settings"][name] for name in free}
        previous["settings"] = defaults | previous["settings"] | memory
    if previous != run_doc:
        changed = sorted(k for k in run_doc if previous.get(k) != run_doc[k])
        raise TrainingError(
            f"{out} holds a run with other {', '.join(changed)}; "
            "use another --out or the same settings to resume"
        )
