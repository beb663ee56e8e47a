"""The resumable training loop (docs/DESIGN.md section 11).

Text is one token stream per batch row; each update sees a window of `update_len`
tokens per row and carries the attention state (without gradient) into the next
window, so the model learns to use context far beyond a window. Everything a run needs
to continue lives in orbax checkpoints under <out>/train/checkpoints (a RunState), from
which the data position follows; a run stopped by Ctrl-C or a kill resumes from there.

Over 300 lines because resuming touches every part of the loop (the log, the data
position, the checkpoints, evaluation, the cluster's watchdog); the step itself is
tvq/train/step.py and the data tvq/corpus/reader.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

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
from tvq.files import warm
from tvq.files.atomic import write_atomically
from tvq.nn.layout import unstack_params
from tvq.nn.state import ModelState, initial_state, stack_state
from tvq.runtime.context import score_ids
from tvq.runtime.forward import check_algorithm
from tvq.runtime.model import Model, init_params
from tvq.train.settings import TrainSettings
from tvq.train.step import compiled_step, learning_rate, step_memory

TRAIN_DIR = "train"
# Settings that change memory, never the numbers: a run may resume with others.
MEMORY_SETTINGS = ("grad_accum", "remat")
METRICS_FILE = "metrics.jsonl"


@flax.struct.dataclass
class RunState:
    """Everything a checkpoint holds."""

    params: Any
    opt_state: Any
    attn_state: ModelState  # carried from window to window, per batch row
    step: jax.Array  # [] int32: updates done
    tokens_seen: jax.Array  # [] float32


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


class MetricsLog:
    """<out>/train/metrics.jsonl: one JSON object per step (step, loss, lr, tokens,
    tokens_per_second) and per evaluation (step, val_loss, val_bits_per_byte), flushed
    as written. A resumed run first drops the records past its checkpoint: those steps
    run again, so each step appears once."""

    def __init__(self, path: Path | None, resume_step: int) -> None:
        self.file = None
        if path is None:  # a process other than 0 in a cluster: nothing to write
            return
        kept = []
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    step = json.loads(line).get("step")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(step, int) and step <= resume_step:
                    kept.append(line + "\n")
        write_atomically(path, lambda f: f.write("".join(kept).encode()))
        self.file = path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def checkpoint_manager(folder: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(folder.absolute(), options=options)


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
    (tvq.train.step.step_memory: None where the backend gives no analysis)."""
    import orbax.checkpoint as ocp

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
    train_dir = out / TRAIN_DIR
    try:
        train_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{train_dir} cannot be created: {e.strerror}") from None
    run_file = train_dir / "run.json"
    run_doc = {
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "tokenizer": tokenizer.fingerprint,
        "data_tokens": int(len(train_tokens)),
    }
    if run_file.exists():  # every process checks; process 0 writes it after the barrier
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise TrainingError(f"{run_file} is corrupt; use another --out") from None
        if not isinstance(previous, dict):
            raise TrainingError(f"{run_file} is corrupt; use another --out")
        if isinstance(previous.get("settings"), dict):  # settings added since, at defaults
            previous["settings"] = dataclasses.asdict(TrainSettings()) | previous["settings"]
        if isinstance(previous.get("settings"), dict):  # memory knobs may change on resume
            previous["settings"] = previous["settings"] | {
                name: run_doc["settings"][name] for name in MEMORY_SETTINGS
            }
        if previous != run_doc:
            changed = sorted(
                k for k in run_doc if previous.get(k) != run_doc[k]
            )  # config, settings, tokenizer or data
            raise TrainingError(
                f"{out} holds a run with other {', '.join(changed)}; "
                "use another --out or the same settings to resume"
            )
    cluster.barrier("run-checked")
    if not run_file.exists() and cluster.is_main():
        text = json.dumps(run_doc, indent=2, sort_keys=True).encode()
        write_atomically(run_file, lambda f: f.write(text))

    optimizer, train_step = compiled_step(config, settings, check_algorithm(algorithm))
    params = init_from.params if init_from is not None else init_params(config, settings.seed)
    place = functools.partial(split_largest_axis if shard_params else replicated, mesh)

    def fresh_state() -> Any:  # an epoch's first attention state, in the step's form
        state = initial_state(config, settings.batch_size)
        return split_rows(mesh, stack_state(state) if train_step.scan else state,
                          train_step.rows_axis)  # fmt: skip

    def as_files(run: RunState) -> RunState:  # the forms checkpoints hold (the reference tree)
        params, opt_state, attn_state = train_step.outward(run.params, run.opt_state,
                                                           run.attn_state)  # fmt: skip
        return run.replace(params=params, opt_state=opt_state, attn_state=attn_state)

    def as_program(run: RunState) -> RunState:  # the forms the step runs on and donates
        params, opt_state, attn_state = train_step.inward(run.params, run.opt_state,
                                                          run.attn_state)  # fmt: skip
        attn_state = split_rows(mesh, attn_state, train_step.rows_axis)
        return run.replace(params=place(params), opt_state=place(opt_state), attn_state=attn_state)

    run = RunState(
        params=place(params),  # new arrays: the step donates its inputs
        opt_state=place(optimizer.init(params)),
        attn_state=split_rows(mesh, initial_state(config, settings.batch_size)),
        step=replicated(mesh, jnp.zeros([], jnp.int32)),
        tokens_seen=replicated(mesh, jnp.zeros([], jnp.float32)),
    )
    manager = checkpoint_manager(train_dir / "checkpoints")
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, run)
        try:
            run = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many kinds; all mean "unreadable"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrainingError(
                f"checkpoint {latest} in {train_dir / 'checkpoints'} cannot be restored "
                f"({first}); remove it to resume from an earlier one"
            ) from None
    run = as_program(run)
    if on_memory is not None:  # the compiled step's memory (tvq train -v)
        shape = (settings.batch_size, settings.update_len)
        tokens = rows_from(mesh, shape, lambda rows: np.zeros((len(range(*rows.indices(
            shape[0]))), shape[1]), np.int32))  # fmt: skip
        on_memory(step_memory(train_step, run.params, run.opt_state, run.attn_state, tokens,
                              tokens, run.step))  # fmt: skip
    step = int(_value(run.step))
    cluster.set_context(f"checkpoints in {train_dir / 'checkpoints'} are intact: run the same "
                        "command again to resume")  # fmt: skip
    resumed_from = step if latest is not None else None
    tokens_per_step = settings.batch_size * settings.update_len
    # one dispatch per step, not a dozen eager ops (a closure over the settings: not stored)
    lr_at = warm.Entry(learning_rate(settings), store=False)
    try:
        log = MetricsLog(train_dir / METRICS_FILE if cluster.is_main() else None, step)
    except OSError as e:
        manager.close()
        raise TrainingError(f"{train_dir / METRICS_FILE} cannot be written: {e.strerror}") from None

    def save(at_step: int) -> None:
        if manager.latest_step() == at_step:  # e.g. Ctrl-C just after a scheduled save
            return
        manager.save(at_step, args=ocp.args.StandardSave(as_files(run)), force=True)
        manager.wait_until_finished()

    def host_params() -> Any:  # the reference tree, whole, as numpy on every process
        params = to_host(mesh, run.params)
        return jax.tree_util.tree_map(np.asarray, unstack_params(params))

    last_eval: dict[str, float] | None = None
    started, done_here = time.perf_counter(), 0
    try:
        while step < settings.steps:
            window = functools.partial(stream.window, step)
            shape = (settings.batch_size, settings.update_len)
            inputs = rows_from(mesh, shape, lambda rows, w=window: w(rows)[:, :-1])
            targets = rows_from(mesh, shape, lambda rows, w=window: w(rows)[:, 1:])
            if stream.starts_epoch(step):
                run = run.replace(attn_state=fresh_state())
            params, opt_state, attn_state, metrics = train_step(
                run.params, run.opt_state, run.attn_state, inputs, targets, run.step
            )
            step += 1
            if shard_params:  # keep the layout (a no-op when jit kept it)
                params, opt_state = place(params), place(opt_state)
            run = RunState(params=params, opt_state=opt_state, attn_state=attn_state,
                           step=replicated(mesh, jnp.asarray(step, jnp.int32)),
                           tokens_seen=run.tokens_seen + tokens_per_step)  # fmt: skip
            done_here += 1
            loss, tokens_seen = float(_value(metrics.loss)), int(_value(run.tokens_seen))
            speed = done_here * tokens_per_step / max(time.perf_counter() - started, 1e-9)
            log.write(step=step, loss=loss, lr=float(lr_at(step - 1)), tokens=tokens_seen,
                      tokens_per_second=round(speed, 1))  # fmt: skip
            eval_now = step % settings.eval_every == 0 or step == settings.steps
            if eval_now and val_documents:
                model = Model(config, host_params(), block_len=settings.block_len)
                last_eval = evaluate(model, val_documents)
                log.write(step=step, val_loss=last_eval["loss"],
                          val_bits_per_byte=last_eval["bits_per_byte"])  # fmt: skip
            if step % settings.save_every == 0 or step == settings.steps:
                save(step)
            if on_progress is not None:
                on_progress(Progress(
                    step=step, steps=settings.steps, loss=loss,
                    tokens_per_second=speed, tokens_seen=tokens_seen,
                    eval=last_eval if eval_now else None, resumed_from=resumed_from,
                ))  # fmt: skip
                resumed_from = None
    except KeyboardInterrupt:
        if cluster.active():  # the peers are in the next step: no collective save now
            raise Interrupted(
                f"interrupted at step {step}; the last checkpoint is step "
                f"{manager.latest_step() or 0}: run the same command again to resume"
            ) from None
        save(step)
        raise Interrupted(
            f"interrupted at step {step}; saved: run the same command again to resume"
        ) from None
    finally:
        manager.close()
        log.close()

    params = host_params()
    if last_eval is None and val_documents:
        last_eval = evaluate(Model(config, params), val_documents)
    metadata = dict(metadata)
    metadata.update(
        steps=step,
        tokens_seen=int(run.tokens_seen),
        train_settings=dataclasses.asdict(settings),
    )
    if last_eval is not None:
        metadata.update(
            heldout_loss=round(last_eval["loss"], 5),
            heldout_bits_per_byte=round(last_eval["bits_per_byte"], 5),
            heldout_tokens=last_eval["tokens"],
            heldout_bytes=last_eval["bytes"],
        )
    model = Model(config, params, block_len=settings.block_len, metadata=metadata,
                  tokenizer=tokenizer)  # fmt: skip
    if cluster.is_main():
        model.save(out)
    cluster.barrier("model-saved")
    return model


def _value(x: jax.Array) -> np.ndarray:
    """A replicated array's value, read from this process's first copy."""
    return np.asarray(x.addressable_data(0))
