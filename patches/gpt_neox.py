"""GPT-NeoX (Pythia) and Persimmon (Persimmon-8B, Fuyu's language model): RoPE on the first ``partial_rotary_factor``
(``rotary_pct``) of each head, one fused ``query_key_value`` projection whose output columns are laid out per head as
``[q_i | k_i | v_i]``.

Persimmon's attention is GPT-NeoX's with an optional ``qk_layernorm``: a LayerNorm of each head's projected keys
(mean removed, bias added) before RoPE, which loses each head's key mean, so ``V = f(K)`` is not exact; such configs
are refused (:data:`hf_slim.registry.CONFIG_REFUSALS`).
"""

from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXModel
from transformers.models.persimmon.modeling_persimmon import PersimmonAttention, PersimmonModel

from hf_slim.toolkit import AttentionRoute, Projections, interleaved_qkv_projections, rope_family


def _head_dim(module: torch.nn.Module) -> int:
    """The head width, as both classes compute it (GPT-NeoX calls it ``head_size``, Persimmon ``head_dim``)."""
    return module.config.hidden_size // module.config.num_attention_heads


def _projections(module: torch.nn.Module) -> Projections:
    heads = module.config.num_attention_heads
    return interleaved_qkv_projections(module.query_key_value, heads, _head_dim(module))  # rows (h, q|k|v, dk)


#: The model's own attention forward (fused projection, partial RoPE, output projection) serves both classes (no copy).
PATCH = rope_family(
    attention=(GPTNeoXAttention, PersimmonAttention),
    base_models=(GPTNeoXModel, PersimmonModel),
    projections=_projections,
    route=AttentionRoute(rotary_parameter="position_embeddings"),
    attributes=("query_key_value", "layer_idx", "config"),
    head_dim=_head_dim,
)
