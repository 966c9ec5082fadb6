"""CTRL: multi-head attention (``MultiHeadAttention``: ``Wq``/``Wk``/``Wv``/``dense`` linears with biases),
sinusoidal absolute positions added to the scaled embeddings before the first layer.

Positions never reach attention, so the input cache applies exactly. No forward is copied: MultiHeadAttention's own
forward runs (it calls the attention interface in every tested release), served through the extension points
(:mod:`hf_slim.interface`). Its forward takes ``(v, k, q, layer_past, ...)``, the same normalised layer input three
times (``EncoderLayer`` passes it so); ``v`` is the input hf_slim caches, and ``layer_past`` carries no ``Cache``
annotation, so the contract names the leading parameters by position.
"""

from __future__ import annotations

import torch
from transformers.models.ctrl.modeling_ctrl import CTRLModel, MultiHeadAttention

from hf_slim.toolkit import CACHE, Projections, routed_family


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.Wk, module.Wv)  # (d, d) each, with biases


#: The model's own forward (Wq/Wk/Wv, the attention interface, dense) serves MultiHeadAttention (no copy).
PATCH = routed_family(
    attention=(MultiHeadAttention,),
    base_models=(CTRLModel,),
    projections=_projections,
    attributes=("Wk", "Wv", "num_heads", "head_dim", "layer_idx", "config"),
    parameters=("v", "k", "q", CACHE),
)
