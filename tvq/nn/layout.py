"""The names of the parameter layout (docs/DESIGN.md section 5), in one place, and the
conversion between the two forms of the tree.

The reference tree follows the reference implementation, so its checkpoints load
unchanged: `transformer_layers_{i}` holds a layer's two VQ-attention sublayers,
`scanned_attn1` and `scanned_attn2`, and each sublayer's codebook lives under
`quantizer`. It is the tree of every file (model directories, reference checkpoints,
training checkpoints), of `Model.params` and of the public calls. The layout check
(tvq/nn/params.py) and the benchmarks walk it through `sublayer_paths` and
`sublayer_params`, and training reaches the codebooks through `is_codebook` and
`map_codebooks` (either form), so nothing else spells these names.

The network runs its 2·n_layer sublayers as one scan (tvq/nn/transformer.py), so inside
a compiled call the sublayers' parameters are stacked: the scanned tree has the same
non-layer entries and, under STACK, one sublayer's tree whose every leaf carries a
leading axis of the 2·n_layer sublayers in the network's order (layer 0's scanned_attn1,
its scanned_attn2, layer 1's, …). `stack_params` and `unstack_params` convert, exactly
(the values are only moved); `stack_within` and `unstack_within` convert every parameter
tree inside a larger tree (an optimiser state holds several), which a training run
does where its checkpoints are written and read (tvq/train/checkpoints.py).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Networks of at most this many sublayers run them one after another (unrolled); deeper
# ones as one scan. Unrolled, a program holds a copy of the sublayer per sublayer, so its
# compilation grows with depth; scanned, each sublayer's weights and state are sliced
# out of the stacked arrays at every step, and XLA:CPU copies such a slice before a
# matrix product: at batch 1, where a decoded token is one pass over the weights, that
# made the built-in model (8 sublayers) decode at 0.60x the unrolled speed
# (bench/depth_forms.py, bench/RESULTS.md section 13). Small networks therefore keep the
# loop (as MaxText keeps it behind scan_layers), and both forms compute the same numbers
# (tests/test_depth.py).
UNROLLED_MAX = 8

LAYERS = "transformer_layers"  # flax's name for item i of a list attribute: LAYERS_{i}
SUBLAYERS = ("scanned_attn1", "scanned_attn2")  # the two sublayers of a layer, in order
QUANTIZER = "quantizer"  # a sublayer's codebook: c_sum [H, S, K], c_count [H, S]
CODEBOOK = ("c_sum", "c_count")  # the codebook's entries under QUANTIZER, in that order
STACK = "sublayers"  # the scanned tree's stacked sublayers: leaves [2·n_layer, ...]


def scanned(n_sublayers: int) -> bool:
    """Whether a network of n_sublayers runs them as a scan (else unrolled)."""
    return n_sublayers > UNROLLED_MAX


def layer_name(index: int) -> str:
    """The name of layer `index` in the reference tree."""
    return f"{LAYERS}_{index}"


def sublayer_paths(n_layer: int) -> list[tuple[str, str]]:
    """(layer, sublayer) names of the 2·n_layer sublayers in the network's order, the
    order of ModelState.sublayers, of the per-sublayer statistics and of STACK's axis."""
    return [(layer_name(i), sub) for i in range(n_layer) for sub in SUBLAYERS]


def n_layers(params: Any) -> int:
    """How many layers a parameter tree holds (either form)."""
    if STACK in params:
        return jax.tree_util.tree_leaves(params[STACK])[0].shape[0] // len(SUBLAYERS)
    count = 0
    while layer_name(count) in params:
        count += 1
    return count


def sublayer_params(params: Any) -> list[Any]:
    """Each sublayer's parameter dict of a reference tree, in the network's order."""
    return [params[layer][sub] for layer, sub in sublayer_paths(n_layers(params))]


def stack_trees(trees: Sequence[Any]) -> Any:
    """Trees of one structure → one tree whose leaves gain a leading axis, one entry per
    tree (parameters, states, rings, statistics of the sublayers)."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_tree(tree: Any) -> tuple[Any, ...]:
    """The inverse of stack_trees: one tree per entry of the leaves' leading axis.

    Inside a trace this is a slice per entry and leaf, and on numpy arrays a view.
    Otherwise each entry is taken by one small compiled program per leaf shape (the
    index is an argument), so converting costs no compilation that grows with depth: a
    compiled program whose outputs are the per-sublayer slices would hold one kernel
    per slice, and XLA:CPU compiles each in milliseconds (bench/RESULTS.md section 13)."""
    leaves = jax.tree_util.tree_leaves(tree)
    count = leaves[0].shape[0]
    on_host = all(isinstance(leaf, np.ndarray) for leaf in leaves)  # views: nothing copied
    if on_host or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        take = operator.itemgetter
        return tuple(jax.tree_util.tree_map(take(i), tree) for i in range(count))
    return tuple(jax.tree_util.tree_map(lambda x, i=i: _take(x, i), tree) for i in range(count))


@jax.jit
def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)


def is_stacked(params: Any) -> bool:
    """Whether a parameter tree is the scanned one."""
    return STACK in params


def stack_params(params: Any) -> Any:
    """Reference tree → scanned tree (a scanned tree is returned as it is). Inside a
    compiled call this is one concatenation per parameter of a sublayer."""
    if is_stacked(params):
        return params
    stacked = stack_trees(sublayer_params(params))
    rest = {k: v for k, v in params.items() if not k.startswith(f"{LAYERS}_")}
    return {**rest, STACK: stacked}


def unstack_params(params: Any) -> Any:
    """Scanned tree → reference tree (a reference tree is returned as it is)."""
    if not is_stacked(params):
        return params
    out = {k: v for k, v in params.items() if k != STACK}
    paths = sublayer_paths(n_layers(params))
    for (layer, sub), tree in zip(paths, unstack_tree(params[STACK]), strict=True):
        out.setdefault(layer, {})[sub] = tree
    return out


def stack_within(tree: Any) -> Any:
    """Every reference parameter tree inside `tree` stacked, the rest as it is: the tree
    itself, or the several an optimiser state holds (Adam's moments, masks)."""
    return jax.tree_util.tree_map(
        lambda x: stack_params(x) if _is_params(x) else x, tree, is_leaf=_is_params
    )


def unstack_within(tree: Any) -> Any:
    """Every scanned parameter tree inside `tree` unstacked (the inverse of stack_within)."""
    return jax.tree_util.tree_map(
        lambda x: unstack_params(x) if _is_params(x) else x, tree, is_leaf=_is_params
    )


def _is_params(x: Any) -> bool:
    """Whether x is a parameter tree of either form (a dict holding the sublayers)."""
    return isinstance(x, dict) and (STACK in x or layer_name(0) in x)


def is_codebook(path: tuple) -> bool:
    """Whether a leaf's key path (jax.tree_util) is a codebook's, in either form."""
    return any(getattr(key, "key", None) in CODEBOOK for key in path)


def parameter_ndim(path: tuple, leaf: Any) -> int:
    """The rank of the parameter a leaf holds: a scanned tree's stacked leaf has the
    sublayers' axis more than the matrix or vector it is."""
    return leaf.ndim - (getattr(path[0], "key", None) == STACK)


def map_codebooks(fn: Callable[..., tuple[Any, Any]], params: Any, per_sublayer: Any) -> Any:
    """params with every codebook replaced: (c_sum, c_count) ← fn(c_sum, c_count, values),
    where per_sublayer holds values [2·n_layer, ...] for the sublayers in the network's
    order. A scanned tree's stacked codebooks take one call with them all; a reference
    tree's take a call per sublayer, with its slice. Only the dicts on the way to a
    codebook are copied."""
    sum_key, count_key = CODEBOOK

    def update(quantizer: dict, values: Any) -> dict:
        total, count = fn(quantizer[sum_key], quantizer[count_key], values)
        return {**quantizer, sum_key: total, count_key: count}

    if is_stacked(params):
        stacked = params[STACK]
        return {**params, STACK: {**stacked, QUANTIZER: update(stacked[QUANTIZER], per_sublayer)}}
    out = dict(params)
    paths = sublayer_paths(n_layers(params))
    for (layer, sub), values in zip(paths, unstack_tree(per_sublayer), strict=True):
        sublayer = params[layer][sub]
        quantizer = update(sublayer[QUANTIZER], values)
        out[layer] = {**out[layer], sub: {**sublayer, QUANTIZER: quantizer}}
    return out
