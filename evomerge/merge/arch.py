"""What a tensor's name says about its place in the model (layer index, kind).

Architectures are recognised by tensor names and config, not by a list of model ids.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# tensors before the decoder layers: token (and position) embeddings; GPT-NeoX's `embed_out`
# is its output head, after the layers
_PRE_LAYER = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|embeddings)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer index of a tensor (`model.layers.3.mlp.up_proj.weight` -> 3), None if none."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def before_layers(tensor_name: str) -> bool:
    """True for the weights mergekit plans before the first layer (its architectures'
    `pre_weights`: the embeddings); the other non-layer weights (final norm, lm_head) come
    after the last layer."""
    return layer_index(tensor_name) is None and _PRE_LAYER.search(tensor_name) is not None


def gradient_t(tensor_name: str, num_layers: int) -> float:
    """Position in [0, 1] at which gradient (list) parameters are evaluated for a tensor.

    Layer i of n is at i / (n - 1) (mergekit's convention for a slice covering the model);
    the only layer of a one-layer model is at 1; tensors outside the decoder layers
    (embeddings, final norm, lm_head) are at 0.
    """
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if num_layers <= 1:  # mergekit puts the only layer of a one-layer slice at t = 1
        return 1.0
    return idx / (num_layers - 1)
