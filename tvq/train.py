"""Training (DESIGN.md section 6): next-token loss + commitment, EMA codebook, AdamW.

Text is one token stream per batch row; each update sees a window of
`update_len` tokens per row and carries the attention state (without gradient)
into the next window, so the model learns to use context far beyond a window.
Everything a run needs to continue lives in orbax checkpoints under
<out>/train/checkpoints: parameters, optimiser state, the attention state and
the step, from which the data position follows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tvq.config import ModelConfig
from tvq.errors import TvqError
from tvq.model import Model, init_params, scan_blocks
from tvq.state import initial_state
from tvq.transformer import Transformer

TRAIN_DIR = "train"


class TrainingError(TvqError):
    """Bad training input or a run that cannot continue."""


class TrainingInterrupted(TvqError):
    """Ctrl-C during training; the last step was saved first."""

    exit_code = 130


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything about a run that is not architecture."""

    steps: int = 2000
    batch_size: int = 16
    update_len: int = 256
    block_len: int = 128
    lr: float = 2e-3
    warmup: int = 100
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    c_beta: float = 1e-4
    c_gamma: float = 0.99
    seed: int = 0
    eval_every: int = 250
    save_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "update_len", "block_len", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise TrainingError(f"warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise TrainingError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.c_gamma < 1:
            raise TrainingError(f"c_gamma must be in [0, 1), got {self.c_gamma}")


# -- data -----------------------------------------------------------------------------------


class TokenStream:
    """Training tokens as B contiguous rows; windows advance along the rows, epoch after epoch.

    Each epoch starts the rows at a fresh random shift, so windows do not align the same way
    twice; the attention state is reset at the start of every epoch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, update_len: int, seed: int) -> None:
        self.tokens = np.asarray(tokens, np.int32)
        self.batch_size, self.update_len, self.seed = batch_size, update_len, seed
        self.row_len = len(self.tokens) // batch_size
        self.windows_per_epoch = (self.row_len - update_len - 1) // update_len
        if self.windows_per_epoch < 1:
            need = batch_size * (2 * update_len + 2)
            raise TrainingError(
                f"not enough training text: {len(self.tokens)} tokens, need at least {need} "
                f"for batch size {batch_size} and update length {update_len}"
            )

    def window(self, step: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(inputs [B, U], targets [B, U], starts_epoch) of update `step`."""
        epoch, index = divmod(step, self.windows_per_epoch)
        shift = np.random.default_rng([self.seed, epoch]).integers(0, self.update_len)
        rows = np.arange(self.batch_size)[:, None] * self.row_len
        start = rows + shift + index * self.update_len
        span = self.tokens[start + np.arange(self.update_len + 1)[None, :]]
        return span[:, :-1], span[:, 1:], index == 0


# -- the step -------------------------------------------------------------------------------


def is_codebook(path: tuple) -> bool:
    return any(getattr(p, "key", None) in ("c_sum", "c_count") for p in path)


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    decay_steps = max(1, settings.steps - settings.warmup)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, settings.lr, max(1, settings.warmup)),
            optax.cosine_decay_schedule(settings.lr, decay_steps, alpha=settings.final_lr_ratio),
        ],
        [settings.warmup],
    )

    def decay_mask(params):  # decoupled weight decay on matrices only
        return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)

    main = optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=settings.weight_decay,
                    mask=decay_mask),
    )  # fmt: skip

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "codebook" if is_codebook(path) else "main", params
        )

    # The codebook is not learned by gradients: it follows an exact EMA (apply_ema).
    return optax.multi_transform({"main": main, "codebook": optax.set_to_zero()}, labels)


def train_forward(config, params, inputs, targets, state, block_len):
    """→ ((Σ NLL, Σ commitment, per-sublayer code statistics), new state)."""
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)
    zero_stats = [
        dict(
            code_sum=jnp.zeros([config.n_head, config.n_code, config.d_k]),
            code_count=jnp.zeros([config.n_head, config.n_code]),
        )
        for _ in range(2 * config.n_layer)
    ]

    def step(carry, block):
        state, nll, commit, stats = carry
        tokens, block_targets = block
        x = net.apply(variables, tokens, state.sublayers[0].pos_offset, method=Transformer.embed)
        state, x, sub_stats = net.apply(variables, x, state, tables, True, method=Transformer.body)
        log_probs = net.apply(variables, x, method=Transformer.log_softmax)
        picked = jnp.take_along_axis(log_probs, block_targets[..., None], axis=-1)
        nll = nll - jnp.sum(picked)
        commit = commit + sum(jnp.sum(s["commit"]) for s in sub_stats)
        stats = [
            {k: acc[k] + new[k] for k in acc} for acc, new in zip(stats, sub_stats, strict=True)
        ]
        return (state, nll, commit, stats), None

    carry = (state, jnp.zeros([]), jnp.zeros([]), zero_stats)
    (state, nll, commit, stats), _ = scan_blocks(step, carry, (inputs, targets), block_len)
    return (nll, commit, stats), state


def apply_ema(params, stats, gamma: float):
    """c_sum ← γ·c_sum + (1 − γ)·Σ k assigned; c_count ← γ·c_count + (1 − γ)·count."""
    params = jax.tree_util.tree_map(lambda x: x, params)  # shallow copy of every dict
    names = sorted(k for k in params if k.startswith("transformer_layers_"))
    names.sort(key=lambda k: int(k.rsplit("_", 1)[1]))
    i = 0
    for layer in names:
        for sub in ("scanned_attn1", "scanned_attn2"):
            quantizer = params[layer][sub]["quantizer"]
            quantizer["c_sum"] = gamma * quantizer["c_sum"] + (1 - gamma) * stats[i]["code_sum"]
            quantizer["c_count"] = (
                gamma * quantizer["c_count"] + (1 - gamma) * stats[i]["code_count"]
            )
            i += 1
    return params


def make_train_step(config: ModelConfig, settings: TrainSettings, optimizer):
    def loss_fn(params, inputs, targets, state):
        (nll, commit, stats), new_state = train_forward(
            config, params, inputs, targets, state, settings.block_len
        )
        count = inputs.size
        loss = nll / count + settings.c_beta * commit / count
        return loss, (nll / count, commit / count, stats, new_state)

    def train_step(params, opt_state, state, inputs, targets):
        grads, (nll, commit, stats, new_state) = jax.grad(loss_fn, has_aux=True)(
            params, inputs, targets, state
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = apply_ema(params, stats, settings.c_gamma)
        metrics = dict(loss=nll, commit=commit, grad_norm=optax.tree.norm(grads))
        return params, opt_state, jax.lax.stop_gradient(new_state), metrics

    return jax.jit(train_step, donate_argnums=(0, 1, 2))


# -- evaluation -----------------------------------------------------------------------------


def evaluate(model: Model, documents: Sequence[tuple[list[int], int]]) -> dict[str, float]:
    """Mean NLL (nats/token) and bits per byte over whole documents, each from its start."""
    from tvq.scoring import score_ids

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


# -- the run --------------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    step: int
    steps: int
    loss: float
    tokens_per_second: float
    tokens_seen: int
    eval: dict[str, float] | None = None
    resumed_from: int | None = None  # set on the first report of a resumed run


def checkpoint_manager(folder: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(folder.absolute(), options=options)


def run_training(
    *,
    out: Path,
    config: ModelConfig,
    settings: TrainSettings,
    train_tokens: np.ndarray,
    val_documents: Sequence[tuple[list[int], int]],
    tokenizer: Any,
    metadata: dict[str, Any],
    init_from: Model | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Model:
    """Trains (or resumes) a run in `out`; writes the model there and returns it."""
    import orbax.checkpoint as ocp

    train_dir = out / TRAIN_DIR
    train_dir.mkdir(parents=True, exist_ok=True)
    run_file = train_dir / "run.json"
    run_doc = {
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "tokenizer": tokenizer.fingerprint,
        "data_tokens": int(len(train_tokens)),
    }
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != run_doc:
            changed = sorted(
                k for k in run_doc if previous.get(k) != run_doc[k]
            )  # config, settings, tokenizer or data
            raise TrainingError(
                f"{out} holds a run with other {', '.join(changed)}; "
                "use another --out or the same settings to resume"
            )
    else:
        run_file.write_text(json.dumps(run_doc, indent=2, sort_keys=True))

    stream = TokenStream(train_tokens, settings.batch_size, settings.update_len, settings.seed)
    optimizer = make_optimizer(settings)
    params = init_from.params if init_from is not None else init_params(config, settings.seed)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    run = dict(
        params=params,
        opt_state=optimizer.init(params),
        attn_state=initial_state(config, settings.batch_size),
        step=jnp.zeros([], jnp.int32),
        tokens_seen=jnp.zeros([], jnp.float32),
    )
    manager = checkpoint_manager(train_dir / "checkpoints")
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, run)
        run = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    step = int(run["step"])
    resumed_from = step if latest is not None else None
    train_step = make_train_step(config, settings, optimizer)
    tokens_per_step = settings.batch_size * settings.update_len

    def save(at_step: int) -> None:
        manager.save(at_step, args=ocp.args.StandardSave(run), force=True)
        manager.wait_until_finished()

    last_eval: dict[str, float] | None = None
    started, done_here = time.perf_counter(), 0
    try:
        while step < settings.steps:
            inputs, targets, fresh = stream.window(step)
            if fresh:
                run["attn_state"] = initial_state(config, settings.batch_size)
            params, opt_state, attn_state, metrics = train_step(
                run["params"], run["opt_state"], run["attn_state"], inputs, targets
            )
            step += 1
            run = dict(params=params, opt_state=opt_state, attn_state=attn_state,
                       step=jnp.asarray(step, jnp.int32),
                       tokens_seen=run["tokens_seen"] + tokens_per_step)  # fmt: skip
            done_here += 1
            eval_now = step % settings.eval_every == 0 or step == settings.steps
            if eval_now and val_documents:
                model = Model(config, run["params"], block_len=settings.block_len)
                last_eval = evaluate(model, val_documents)
            if step % settings.save_every == 0 or step == settings.steps:
                save(step)
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(Progress(
                    step=step, steps=settings.steps, loss=float(metrics["loss"]),
                    tokens_per_second=done_here * tokens_per_step / max(elapsed, 1e-9),
                    tokens_seen=int(run["tokens_seen"]), eval=last_eval if eval_now else None,
                    resumed_from=resumed_from,
                ))  # fmt: skip
                resumed_from = None
    except KeyboardInterrupt:
        save(step)
        raise TrainingInterrupted(
            f"interrupted at step {step}; saved: run the same command again to resume"
        ) from None
    finally:
        manager.close()

    if last_eval is None and val_documents:
        last_eval = evaluate(Model(config, run["params"]), val_documents)
    metadata = dict(metadata)
    metadata.update(
        steps=step,
        tokens_seen=int(run["tokens_seen"]),
        train_settings=dataclasses.asdict(settings),
    )
    if last_eval is not None:
        metadata.update(
            heldout_loss=round(last_eval["loss"], 5),
            heldout_bits_per_byte=round(last_eval["bits_per_byte"], 5),
            heldout_tokens=last_eval["tokens"],
            heldout_bytes=last_eval["bytes"],
        )
    model = Model(config, run["params"], block_len=settings.block_len, metadata=metadata,
                  tokenizer=tokenizer)  # fmt: skip
    model.save(out)
    return model
