"""Phi-3 / Phi-3.5: RoPE (default or longrope with short/long factors), fused ``qkv_proj`` (rows ``[q | k | v]``).

Longrope switches from the short to the long factors once a forward sees a position past
``original_max_position_embeddings``; the slim cache keeps each token's cos/sin as it was written, so keys rotated
with the short factors stay un-rotated with them (:mod:`hf_slim.rope`). ``sliding_window`` is handled by the model's
own mask and attention interface.
"""

from __future__ import annotations

import torch
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3Model

from hf_slim.toolkit import AttentionRoute, Projections, rope_family


def _projections(module: torch.nn.Module) -> Projections:
    e = module.config.num_attention_heads * module.head_dim
    return Projections.of(module.qkv_proj, module.qkv_proj, slice(e, 2 * e), slice(2 * e, None))  # qkv: [Q | K | V]


#: The model's own attention forward (fused projection, RoPE, sliding-window argument, output projection) serves the
#: class (no copy).
PATCH = rope_family(
    attention=(Phi3Attention,),
    base_models=(Phi3Model,),
    projections=_projections,
    route=AttentionRoute(rotary_parameter="position_embeddings"),
    attributes=("qkv_proj", "head_dim", "layer_idx", "config"),
)
