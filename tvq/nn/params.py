"""The parameter tree: its layout (the reference implementation's names and shapes,
docs/DESIGN.md sections 4-5), fresh initialisation, and the check every loaded tree
passes, whatever its source (a tvq model directory or a reference checkpoint). Every
tree here is the reference tree; the network stacks it inside each compiled call
(tvq/nn/layout.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvq.config import ModelConfig
from tvq.errors import CheckpointError
from tvq.nn.layout import QUANTIZER, sublayer_paths, unstack_params
from tvq.nn.transformer import Transformer


def param_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape (docs/DESIGN.md section 4's layout), worked out from
    the config alone: checking a checkpoint costs no tracing of the model at start-up.
    tests/test_checkpoint_and_errors.py holds it equal to what `init_stacked` makes."""
    d, n = config.d_model, config.n_vocab
    hk, hv = config.n_head * config.d_k, config.n_head * config.d_v
    layout = {"token_embedder/embs": (n, d), "token_embedder/bias_out": (n,)}
    if config.pe_abs:
        layout["position_embedder/scale"] = ()
    for layer, sub in sublayer_paths(config.n_layer):
        prefix = f"{layer}/{sub}/"
        layout.update({
            prefix + "input_ln/g": (d,), prefix + "input_ln/b": (d,),
            prefix + "q_proj/kernel": (d, hk),
            prefix + "kvg_proj/kernel": (d, hk + 2 * hv),
            prefix + "r_proj/kernel": (d, hk),
            prefix + "res_proj/kernel": (hv, d),
            prefix + "u": (hk,), prefix + "v": (hk,),
            f"{prefix}{QUANTIZER}/c_sum": (config.n_head, config.n_code, config.d_k),
            f"{prefix}{QUANTIZER}/c_count": (config.n_head, config.n_code),
        })  # fmt: skip
    if config.e_preln:
        layout.update({"out_ln/g": (d,), "out_ln/b": (d,)})
    if not config.e_tie:
        layout.update({"out_proj/kernel": (d, n), "out_proj/bias": (n,)})
    return layout


def init_stacked(config: ModelConfig, key: jax.Array) -> Any:
    """Fresh parameters (docs/DESIGN.md section 4's initialisers) as the scanned tree
    (tvq/nn/layout.py): the flax modules make it without running the network, each
    sublayer drawn from its own key (tvq.nn.transformer.init_sublayers). Jit it and
    unstack outside (tvq.runtime.model.init_params): a program whose outputs were the
    reference tree's leaves would grow with depth."""
    return Transformer(config).init(key, method=Transformer.create)["params"]


def param_shapes(config: ModelConfig) -> Any:
    """The parameter tree of `config` (the reference layout) as ShapeDtypeStructs,
    without computing anything."""
    return jax.eval_shape(
        lambda key: unstack_params(init_stacked(config, key)), jax.random.PRNGKey(0)
    )


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a/b/c": leaf}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key in sorted(tree):
            out.update(flatten(tree[key], f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): tree}


def check_params(params: Any, config: ModelConfig, source: str) -> Any:
    """Checks names and shapes against `config`; returns params cast to its param_dtype.
    The first difference is named in a CheckpointError."""
    want = param_layout(config)
    got = flatten(params)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise CheckpointError(
                f"{source}: parameter {name} is missing (the config needs shape {want[name]})"
            )
        if name not in want:
            shape = tuple(np.shape(got[name]))
            raise CheckpointError(
                f"{source}: parameter {name} {shape} is not used by this config "
                "(check e_tie, e_preln, pe_abs, n_layer)"
            )
        if tuple(np.shape(got[name])) != want[name]:
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(np.shape(got[name]))}, "
                f"the config needs {want[name]}"
            )
    dtype = config.param_dtype
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), nest(got))


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} → nested dict (the inverse of flatten)."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree
