"""The resumable training loop (docs/DESIGN.md section 11).

Text is one token stream per batch row; each update sees a window of `update_len`
tokens per row and carries the attention state (without gradient) into the next
window, so the model learns to use context far beyond a window. Everything a run needs
to continue lives in orbax checkpoints under <out>/train/checkpoints (a RunState), from
which the data position follows; a run stopped by Ctrl-C or a kill resumes from there.

`run_training` is a recipe of stages (`_Training`'s methods): the run's folder, its
state restored or fresh, the step's memory, the loop of updates, the model. The step
itself is tvq/train/step.py, run.json and the checkpoints tvq/train/checkpoints.py (where
the run's layout and the files' meet), the data tvq/corpus/reader.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tvq.config import ModelConfig
from tvq.corpus.reader import TokenShards, TokenStream
from tvq.distributed import cluster
from tvq.distributed.devices import (
    data_mesh,
    replicated,
    rows_from,
    split_largest_axis,
    split_rows,
    to_host,
)
from tvq.errors import Interrupted, TrainingError
from tvq.files.atomic import write_atomically
from tvq.files.checkpoint import RECIPE_FILE
from tvq.nn.state import initial_state
from tvq.runtime.context import score_ids
from tvq.runtime.forward import check_algorithm
from tvq.runtime.model import Model, init_params
from tvq.train.average import initial_average, update_average
from tvq.train.checkpoints import (
    TRAIN_DIR,  # noqa: F401 (tvq/train/run.py imports it from here)
    Checkpoints,
    RunState,
    open_run_dir,
    to_file_layout,
    to_run_layout,
)
from tvq.train.evalset import eval_documents
from tvq.train.logs import Logs, check_loggers, open_logs
from tvq.train.meter import StepMeter
from tvq.train.settings import TrainSettings
from tvq.train.step import StepMetrics, compiled_step, rows_axis, step_memory


def evaluate(model: Model, documents: Sequence[tuple[Sequence[int], int]]) -> dict[str, float]:
    """Mean NLL (nats/token) and bits per byte over whole documents, each from its start."""
    nll, tokens, n_bytes = 0.0, 0, 0
    for ids, size in documents:
        result, _ = score_ids(model, ids)
        nll += result.nll_sum
        tokens += result.tokens
        n_bytes += size
    return dict(
        loss=nll / max(tokens, 1),
        bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
        tokens=tokens,
        bytes=n_bytes,
    )


@dataclasses.dataclass
class Progress:
    step: int
    steps: int
    loss: float
    tokens_per_second: float
    tokens_seen: int
    eval: dict[str, float] | None = None
    resumed_from: int | None = None  # set on the first report of a resumed run


def run_training(
    *,
    out: Path,
    config: ModelConfig,
    settings: TrainSettings,
    train_tokens: np.ndarray | TokenShards,
    val_documents: Sequence[tuple[Sequence[int], int]],
    tokenizer: Any,
    metadata: dict[str, Any],
    init_from: Model | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    devices: int | None = None,
    shard_params: bool = False,
    algorithm: str | None = None,
    on_memory: Callable[[dict[str, int] | None], None] | None = None,
    log_dir: Path | None = None,
    wandb_project: str | None = None,
    recipe: str | None = None,
) -> Model:
    """Trains (or resumes) a run in `out`; writes the model there and returns it.

    Data parallel over `devices` devices per process (None: all that JAX sees): each
    step's batch rows and the attention state are split over them; parameters and
    optimiser state are replicated, or with shard_params split over the devices
    (FSDP-style, for a model larger than one device's memory). The numbers depend on
    neither (float rounding aside), and a run resumes on any device count. In a cluster
    (tvq/distributed/cluster.py) every process runs this with the same arguments; each builds only
    its devices' rows of a batch, and process 0 alone writes run.json, the log and the
    model (orbax writes the checkpoints from every process). algorithm (None: the faster
    for the device) is the serial or parallel form: same loss and gradient, so a run
    may resume with the other. train_tokens: the training stream (an array, or the
    memory-mapped shards of a prepared dataset, of which each process reads only its
    rows); val_documents: (token ids, UTF-8 bytes) of each held-out document.
    on_memory, if given, receives the compiled step's memory before the first step
    (tvq.train.step.step_memory: None where the backend gives no analysis). log_dir:
    TensorBoard event files there; wandb_project: a Weights & Biases run in it
    (tvq/train/logs.py). recipe: the run's settings as TOML, kept as <out>/recipe.toml.

    The stages: the run's folder (run.json checked or written), its state (the latest
    checkpoint's, else fresh) in the run's layout, the step's memory, the updates, and
    the model with its held-out figures (the best checkpoint's with keep "best")."""
    check_loggers(log_dir, wandb_project)
    mesh = data_mesh(devices)
    if settings.batch_size % mesh.size:
        raise TrainingError(
            f"batch size {settings.batch_size} must be a multiple of the {mesh.size} devices "
            "(use --devices to choose fewer)"
        )
    if settings.grad_accum > 1:
        settings.check_devices(mesh.size)
    # The data must fit the settings before anything is written: a run that cannot start
    # leaves no run.json behind to refuse the corrected command.
    stream = TokenStream(train_tokens, settings.batch_size, settings.update_len, settings.seed)
    train_dir = open_run_dir(out, config, settings, tokenizer, len(train_tokens))
    if recipe is not None and cluster.is_main():
        write_atomically(out / RECIPE_FILE, lambda f: f.write(recipe.encode()))
    val = eval_documents(val_documents, settings.eval_tokens, settings.seed, tokenizer, train_dir)
    optimizer, train_step = compiled_step(config, settings, check_algorithm(algorithm))
    job = _Training(config, settings, mesh, shard_params, stream, train_step, val)
    checkpoints = Checkpoints(train_dir, settings.keep)
    try:
        resumed = checkpoints.latest() is not None
        run = job.in_run_layout(checkpoints.restore(job.fresh(optimizer, init_from)))
        if on_memory is not None:  # the compiled step's memory (tvq train -v)
            on_memory(job.step_memory(run))
        cluster.set_context(f"checkpoints in {checkpoints.folder} are intact: run the same "
                            "command again to resume")  # fmt: skip
        described = dict(config.to_dict(), **dataclasses.asdict(settings))
        log = open_logs(train_dir, int(_value(run.step)), log_dir, wandb_project, described,
                        main=cluster.is_main())  # fmt: skip
        try:
            run, last_eval = job.loop(run, checkpoints, log, on_progress, resumed)
        finally:
            log.close()
        exported = job.exported(run, last_eval, checkpoints)
    finally:
        checkpoints.close()
    return job.save_model(out, run, exported, metadata, tokenizer)


@dataclasses.dataclass(frozen=True)
class _Training:
    """What the stages of run_training share. The RunState they pass on is in the run's
    layout (tvq/train/checkpoints.py) and on the mesh, where the step donates it."""

    config: ModelConfig
    settings: TrainSettings
    mesh: Mesh
    shard_params: bool
    stream: TokenStream
    train_step: Callable
    val_documents: Sequence[tuple[Sequence[int], int]]

    def fresh(self, optimizer, init_from: Model | None) -> RunState:
        """A new run's state in the files' layout, on the mesh: init_from's parameters or
        new ones; also what a checkpoint is restored into."""
        config, settings = self.config, self.settings
        params = init_from.params if init_from is not None else init_params(config, settings.seed)
        return RunState(
            params=self.place(params),  # new arrays: the step donates its inputs
            opt_state=self.place(optimizer.init(params)),
            attn_state=split_rows(self.mesh, initial_state(config, settings.batch_size)),
            step=replicated(self.mesh, jnp.zeros([], jnp.int32)),
            tokens_seen=replicated(self.mesh, jnp.zeros([], jnp.float32)),
            ema=None if settings.ema is None else self.place(initial_average(params)),
        )

    def in_run_layout(self, run: RunState) -> RunState:
        """A RunState in the files' layout → in the run's, on the mesh."""
        run = to_run_layout(run, self.config)
        state = run.attn_state
        ema = None if run.ema is None else self.place(run.ema)
        return run.replace(params=self.place(run.params), opt_state=self.place(run.opt_state),
                           attn_state=split_rows(self.mesh, state, rows_axis(state)),
                           ema=ema)  # fmt: skip

    def place(self, tree: Any) -> Any:
        """Parameters or optimiser state on the mesh: replicated, or split (shard_params)."""
        return (split_largest_axis if self.shard_params else replicated)(self.mesh, tree)

    def step_memory(self, run: RunState) -> dict[str, int] | None:
        """The compiled step's memory for this run (tvq.train.step.step_memory)."""
        shape = (self.settings.batch_size, self.settings.update_len)
        tokens = rows_from(self.mesh, shape, lambda rows: np.zeros(
            (len(range(*rows.indices(shape[0]))), shape[1]), np.int32))  # fmt: skip
        return step_memory(self.train_step, run.params, run.opt_state, run.attn_state, tokens,
                           tokens, run.step)  # fmt: skip

    def loop(
        self, run: RunState, checkpoints: Checkpoints, log: Logs,
        on_progress: Callable[[Progress], None] | None, resumed: bool,
    ) -> tuple[RunState, dict[str, float] | None]:  # fmt: skip
        """The updates from run's step to the last: each logged and reported, the held-out
        documents scored every eval_every steps and at the end, a checkpoint every
        save_every steps, at the end and (keep "best") at each evaluation. → (the last
        state, the last evaluation). Ctrl-C saves where the run stands and raises
        Interrupted."""
        settings = self.settings
        step = int(_value(run.step))
        resumed_from = step if resumed else None
        meter = StepMeter(self.config, settings, list(self.mesh.devices.flat))
        last_eval = None
        try:
            while step < settings.steps:
                run, metrics = self.update(run, step)
                step += 1
                record = meter.record(step, float(_value(metrics.loss)),
                                      float(_value(metrics.grad_norm)),
                                      int(_value(run.tokens_seen)))  # fmt: skip
                log.write(**record)
                evaluation = None
                if step % settings.eval_every == 0 or step == settings.steps:
                    evaluation = self.held_out(run) if self.val_documents else None
                if evaluation is not None:
                    last_eval = evaluation
                    log.write(step=step, val_loss=evaluation["loss"],
                              val_bits_per_byte=evaluation["bits_per_byte"])  # fmt: skip
                if (step % settings.save_every == 0 or step == settings.steps
                        or (evaluation is not None and settings.keep == "best")):  # fmt: skip
                    checkpoints.save(step, run, evaluation)
                if on_progress is not None:
                    on_progress(Progress(
                        step=step, steps=settings.steps, loss=record["loss"],
                        tokens_per_second=record["tokens_per_second"],
                        tokens_seen=record["tokens"], eval=evaluation, resumed_from=resumed_from,
                    ))  # fmt: skip
                    resumed_from = None
        except KeyboardInterrupt:
            raise _interrupted(step, run, checkpoints) from None
        return run, last_eval

    def update(self, run: RunState, step: int) -> tuple[RunState, StepMetrics]:
        """Update number `step` (from 0) on its window of the stream, and the parameters'
        average after it; an epoch starts from a fresh attention state."""
        settings = self.settings
        window = functools.partial(self.stream.window, step)
        shape = (settings.batch_size, settings.update_len)
        inputs = rows_from(self.mesh, shape, lambda rows: window(rows)[:, :-1])
        targets = rows_from(self.mesh, shape, lambda rows: window(rows)[:, 1:])
        if self.stream.starts_epoch(step):
            fresh = to_run_layout(initial_state(self.config, settings.batch_size), self.config)
            run = run.replace(attn_state=split_rows(self.mesh, fresh, rows_axis(fresh)))
        params, opt_state, attn_state, metrics = self.train_step(
            run.params, run.opt_state, run.attn_state, inputs, targets, run.step
        )
        ema = run.ema
        if ema is not None:
            ema = update_average(ema, params, settings.ema)
        if self.shard_params:  # keep the sharding (a no-op when jit kept it)
            params, opt_state = self.place(params), self.place(opt_state)
            ema = None if ema is None else self.place(ema)
        run = RunState(params=params, opt_state=opt_state, attn_state=attn_state,
                       step=replicated(self.mesh, jnp.asarray(step + 1, jnp.int32)),
                       tokens_seen=run.tokens_seen + shape[0] * shape[1], ema=ema)  # fmt: skip
        return run, metrics

    def weights(self, run: RunState, use_average: bool = True) -> Any:
        """The parameters a model of the run holds, in the files' layout, whole, as numpy
        on every process: the average (in the parameters' dtypes) when the run keeps one
        and use_average, else the parameters."""
        tree = run.params
        if run.ema is not None and use_average:
            tree = jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), run.ema, run.params)
        return jax.tree_util.tree_map(np.asarray, to_file_layout(to_host(self.mesh, tree)))

    def held_out(self, run: RunState) -> dict[str, float]:
        """The held-out documents scored with the run's weights (the average when on)."""
        model = Model(self.config, self.weights(run), block_len=self.settings.block_len)
        return evaluate(model, self.val_documents)

    def exported(
        self, run: RunState, last_eval: dict[str, float] | None, checkpoints: Checkpoints
    ) -> tuple[Any, dict[str, float] | None, dict[str, Any]]:
        """What the run writes as its model: (weights, their held-out figures, what the
        metadata adds). The last state's, or with keep "best" the best checkpoint's; the
        average unless export is "last"."""
        extra: dict[str, Any] = {}
        best = checkpoints.best()
        if best is not None and best[0] != int(_value(run.step)):
            step, last_eval = best
            run = self.in_run_layout(checkpoints.restore(to_file_layout(run), step))
            extra["exported_step"] = step
        elif best is not None:
            last_eval = best[1]
        use_average = self.settings.export == "ema"
        if run.ema is not None:
            extra["exported_weights"] = "ema" if use_average else "last"
        return self.weights(run, use_average), last_eval, extra

    def save_model(
        self, out: Path, run: RunState,
        exported: tuple[Any, dict[str, float] | None, dict[str, Any]],
        metadata: dict[str, Any], tokenizer: Any,
    ) -> Model:  # fmt: skip
        """The trained model (`exported`), with the run and its held-out figures in its
        metadata, written to `out` by process 0."""
        params, last_eval, extra = exported
        if last_eval is None and self.val_documents:
            last_eval = evaluate(Model(self.config, params), self.val_documents)
        metadata = dict(metadata, steps=int(_value(run.step)), tokens_seen=int(run.tokens_seen),
                        train_settings=dataclasses.asdict(self.settings), **extra)  # fmt: skip
        if last_eval is not None:
            metadata.update(
                heldout_loss=round(last_eval["loss"], 5),
                heldout_bits_per_byte=round(last_eval["bits_per_byte"], 5),
                heldout_tokens=last_eval["tokens"],
                heldout_bytes=last_eval["bytes"],
            )
        model = Model(self.config, params, block_len=self.settings.block_len, metadata=metadata,
                      tokenizer=tokenizer)  # fmt: skip
        if cluster.is_main():
            model.save(out)
        cluster.barrier("model-saved")
        return model


def _interrupted(step: int, run: RunState, checkpoints: Checkpoints) -> Interrupted:
    """Ctrl-C at `step`: the run saved there, except in a cluster, whose peers are in the
    next step (no collective save now: the last checkpoint stands)."""
    if cluster.active():
        return Interrupted(
            f"interrupted at step {step}; the last checkpoint is step "
            f"{checkpoints.latest() or 0}: run the same command again to resume"
        )
    checkpoints.save(step, run)
    return Interrupted(f"interrupted at step {step}; saved: run the same command again to resume")


def _value(x: jax.Array) -> np.ndarray:
    """A replicated array's value, read from this process's first copy."""
    return np.asarray(x.addressable_data(0))
