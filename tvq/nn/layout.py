"""The names of the parameter layout (docs/DESIGN.md section 5), in one place.

The tree follows the reference implementation, so its checkpoints load unchanged:
`transformer_layers_{i}` holds a layer's two VQ-attention sublayers, `scanned_attn1`
and `scanned_attn2`, and each sublayer's codebook lives under `quantizer`. The flax
modules take their names from here (tvq/nn/transformer.py), the layout check
(tvq/nn/params.py), the codebook EMA of training and the benchmarks walk the tree
through `sublayer_paths` and `sublayer_params`, so nothing else spells these names.
"""

from __future__ import annotations

from typing import Any

LAYERS = "transformer_layers"  # a list attribute: flax names its items LAYERS_{i}
SUBLAYERS = ("scanned_attn1", "scanned_attn2")  # the two sublayers of a layer, in order
QUANTIZER = "quantizer"  # a sublayer's codebook: c_sum [H, S, K], c_count [H, S]


def layer_name(index: int) -> str:
    """The name of layer `index` in the tree (flax's name for item i of a list)."""
    return f"{LAYERS}_{index}"


def sublayer_paths(n_layer: int) -> list[tuple[str, str]]:
    """(layer, sublayer) names of the 2·n_layer sublayers in the network's order, the
    order of ModelState.sublayers and of the per-sublayer statistics."""
    return [(layer_name(i), sub) for i in range(n_layer) for sub in SUBLAYERS]


def n_layers(params: Any) -> int:
    """How many layers a parameter tree holds."""
    count = 0
    while layer_name(count) in params:
        count += 1
    return count


def sublayer_params(params: Any) -> list[Any]:
    """Each sublayer's parameter dict, in the network's order."""
    return [params[layer][sub] for layer, sub in sublayer_paths(n_layers(params))]
