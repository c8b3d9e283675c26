"""What a tensor's name says about its place in the model (layer index, kind).

Architectures are recognised by tensor names and config, not by a list of model ids.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer index of a tensor (`model.layers.3.mlp.up_proj.weight` -> 3), None if none."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


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
