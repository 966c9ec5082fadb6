"""GPT-NeoX (Pythia): RoPE on the first ``partial_rotary_factor`` (``rotary_pct``) of each head, one fused
``query_key_value`` projection whose output columns are laid out per head as ``[q_i | k_i | v_i]``."""

from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXModel

from hf_slim.toolkit import AttentionRoute, Projections, interleaved_qkv_projections, rope_family


def _projections(module: torch.nn.Module) -> Projections:
    heads, head_dim = module.config.num_attention_heads, module.head_size
    return interleaved_qkv_projections(module.query_key_value, heads, head_dim)  # rows (h, q|k|v, dk)


#: The model's own attention forward (fused projection, partial RoPE, output projection) serves the class (no copy).
PATCH = rope_family(
    attention=(GPTNeoXAttention,),
    base_models=(GPTNeoXModel,),
    projections=_projections,
    route=AttentionRoute(rotary_parameter="position_embeddings"),
    attributes=("query_key_value", "head_size", "layer_idx", "config"),
    head_dim=lambda module: module.head_size,
)
