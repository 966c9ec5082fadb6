"""Phi-2 (``phi``) and StableLM (``stablelm``): RoPE on the first ``partial_rotary_factor`` of each head, separate
``q_proj``/``k_proj``/``v_proj`` with biases (StableLM: ``use_qkv_bias``).

The un-rotated tail of each head passes through the cache as it is. ``qk_layernorm`` normalises each head's keys per
token, so ``V = f(K)`` is not exact there: refused per layer (the layer keeps the model's own K and V).
"""

from __future__ import annotations

import torch
from transformers.models.phi.modeling_phi import PhiAttention, PhiModel
from transformers.models.stablelm.modeling_stablelm import StableLmAttention, StableLmModel

from hf_slim.toolkit import AttentionRoute, Projections, rope_family


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj)


def _k_mode_refusal(module: torch.nn.Module) -> str | None:
    if module.qk_layernorm:
        return "qk_layernorm normalises each head's keys per token, so V is not a linear function of the cached keys"
    return None


#: The model's own attention forward (projections, partial RoPE, output projection) serves both classes (no copy).
PATCH = rope_family(
    attention=(PhiAttention, StableLmAttention),
    base_models=(PhiModel, StableLmModel),
    projections=_projections,
    route=AttentionRoute(rotary_parameter="position_embeddings"),
    attributes=("k_proj", "v_proj", "layer_idx", "config", "qk_layernorm"),
    k_mode_refusal=_k_mode_refusal,
)
