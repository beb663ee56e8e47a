"""Scoring with a baseline model in the same pass (`tvq score --baseline`): per token,
KL(baseline ‖ model) over the whole vocabulary, both models' NLLs and whether their
most likely next tokens agree; like llama.cpp's --kl-divergence. Only per-token
numbers leave the compiled call, never a distribution, so memory stays flat."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvq.config import ModelConfig
from tvq.errors import InputError
from tvq.files import warm
from tvq.nn.state import ModelState
from tvq.runtime.forward import forward, on_device
from tvq.runtime.model import Model

COMPARE_CHUNK = 2048  # tokens per compiled call: two [T, vocabulary] tables live at once


def check_baseline(model: Model, baseline: Model) -> None:
    """Both models must read the same tokens: the same tokenizer, the same vocabulary."""
    a, b = model.tokenizer, baseline.tokenizer
    if a is None or b is None or a.fingerprint != b.fingerprint or \
            model.config.n_vocab != baseline.config.n_vocab:  # fmt: skip
        raise InputError("the baseline model has another tokenizer: models compare only on "
                         "the same tokens")  # fmt: skip


@warm.entry(
    static_argnames=("config", "base_config", "block_len", "algorithm", "base_algorithm", "top_k")
)
def _compare(config: ModelConfig, params: Any, state: ModelState, base_config: ModelConfig,
             base_params: Any, base_state: ModelState, inputs: jax.Array, targets: jax.Array,
             block_len: int, algorithm: str, base_algorithm: str, top_k: int):  # fmt: skip
    """→ (model NLL, baseline NLL, KL(baseline ‖ model), same top-1) per token [B, T],
    the model's top_k log-probs and ids [B, T, k], and both states."""
    log_probs, state = forward(config, params, inputs, state, block_len, algorithm=algorithm)
    base, base_state = forward(base_config, base_params, inputs, base_state, block_len,
                               algorithm=base_algorithm)  # fmt: skip
    kl = jnp.maximum(jnp.sum(jnp.exp(base) * (base - log_probs), axis=-1), 0.0)
    pick = lambda lp: -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    same = jnp.argmax(log_probs, axis=-1) == jnp.argmax(base, axis=-1)
    top_values, top_ids = jax.lax.top_k(log_probs, top_k)
    return (pick(log_probs), pick(base), kl, same, top_values, top_ids.astype(jnp.int32), state,
            base_state)  # fmt: skip


def compare_ids(model: Model, baseline: Model, ids, last_token, state: ModelState,
                base_state: ModelState, sizes: Iterable[int], block_len: int,
                top_k: int = 0):  # fmt: skip
    """Scores ids [T] with both models, each continuing its own state after the token
    last_token [1], in pieces of the given sizes (summing to T; tvq.scoring.stream cuts them) →
    (dict of per-token arrays nll, baseline_nll, kl, same_top1 [T] and top_log_probs,
    top_ids [T, top_k] (the model's most likely tokens); state; base_state)."""
    ids = np.asarray(ids, np.int32)[None, :]
    inputs = np.concatenate([np.asarray(last_token)[:, None], ids[:, :-1]], axis=1)
    keys = ("nll", "baseline_nll", "kl", "same_top1", "top_log_probs", "top_ids")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    start = 0
    for size in sizes:
        for _ in range(max(1, size // COMPARE_CHUNK)):
            step = min(size, COMPARE_CHUNK)
            piece = slice(start, start + step)
            args = on_device((state, base_state, inputs[:, piece], ids[:, piece]))
            *outs, state, base_state = _compare(
                model.config, model.params, args[0], baseline.config, baseline.params, args[1],
                args[2], args[3], min(block_len, step), model.algorithm, baseline.algorithm,
                top_k,
            )  # fmt: skip
            for key, out in zip(parts, outs, strict=True):
                parts[key].append(np.asarray(out[0]))
            start += step
    return {key: np.concatenate(value) for key, value in parts.items()}, state, base_state
