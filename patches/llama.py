"""Llama and the MHA families that share its attention: RoPE, separate ``q_proj``/``k_proj``/``v_proj``.

Covers ``llama`` (Llama-2, CodeLlama, Vicuna, SmolLM2-1.7B; every rope scaling type, optional ``attention_bias``),
``qwen2`` with MHA configs (Qwen1.5: q/k/v biases; sliding-window layers are refused), ``olmo`` (its ``clip_qkv``
clamps the keys, so ``V = f(K)`` is not exact: refused per layer, the layer keeps the model's own K and V) and
``olmo2``: it RMS-normalises the full-width queries and keys per token before RoPE (``q_norm``, ``k_norm``); this
patch only says where the key norm is (:class:`~hf_slim.projections.KeyNorm`), and the K cache keeps each token's key
scale beside the normalised keys, which makes ``V`` linear in them again (:mod:`hf_slim.kmode`: ``e + r + 1``
numbers per token).

RoPE layers keep the K cache with keys cached as the model rotated them (:mod:`hf_slim.rope`). No forward is
copied: the model's own attention forward runs and hf_slim serves its cache update and attention call
(:mod:`hf_slim.interface`).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel
from transformers.models.olmo.modeling_olmo import OlmoAttention, OlmoModel
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2Model

from hf_slim.toolkit import AttentionRoute, Projections, rope_family


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj, key_norm=getattr(module, "k_norm", None))  # k_norm: OLMo-2


def _pre_norm_keys(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """OLMo-2's keys before its ``k_norm``, ``(batch, new, e)``: what the model's own ``k_proj`` gives (the K cache
    keeps each token's key scale, computed from them)."""
    return module.k_proj(hidden_states)


def _k_mode_refusal(module: torch.nn.Module) -> str | None:
    """Why ``V = f(K)`` is not exact in this layer, or None."""
    clip = getattr(module.config, "clip_qkv", None)
    if clip is not None:
        return f"clip_qkv={clip} clamps keys and values, so V is not a linear function of the cached keys"
    if getattr(module, "sliding_window", None) is not None:
        return f"sliding-window layer (window {module.sliding_window}): the slim cache keeps full-attention layers only"
    return None


#: The model's own attention forward serves every class (no copy): it projects, normalises (OLMo-2), rotates with its
#: own function (OLMo casts float32 cos/sin back), calls the slim cache's update and hf_slim's attention function.
PATCH = rope_family(
    attention=(LlamaAttention, Qwen2Attention, OlmoAttention, Olmo2Attention),
    base_models=(LlamaModel, Qwen2Model, OlmoModel, Olmo2Model),
    projections=_projections,
    route=AttentionRoute(rotary_parameter="position_embeddings", pre_norm_keys=_pre_norm_keys),
    attributes=("k_proj", "v_proj", "layer_idx", "config"),
    k_mode_refusal=_k_mode_refusal,
)
