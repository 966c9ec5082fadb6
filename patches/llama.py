"""Llama and the MHA families that share its attention: RoPE, separate ``q_proj``/``k_proj``/``v_proj``.

Covers ``llama`` (Llama-2, CodeLlama, Vicuna, SmolLM2-1.7B; every rope scaling type, optional ``attention_bias``),
``qwen2`` with MHA configs (Qwen1.5: q/k/v biases; sliding-window layers are refused), ``olmo`` (its ``clip_qkv``
clamps the keys, so ``V = f(K)`` is not exact: refused per layer, the layer keeps the model's own K and V) and
``olmo2``: it RMS-normalises the full-width queries and keys per token before RoPE (``q_norm``, ``k_norm``); this
patch only says where the key norm is (:class:`~hf_slim.attention.KeyNorm`), and the K cache keeps each token's key
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

from hf_slim._compat import route_contracts
from hf_slim.projections import Projections
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionRoute, AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (LlamaAttention, Qwen2Attention, OlmoAttention, Olmo2Attention)
BASE_MODEL_CLASSES = (LlamaModel, Qwen2Model, OlmoModel, Olmo2Model)


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj, key_norm=getattr(module, "k_norm", None))  # k_norm: OLMo-2


def _pre_norm_keys(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """OLMo-2's keys before its ``k_norm``, ``(batch, new, e)``: what the model's own ``k_proj`` gives (the K cache
    keeps each token's key scale, computed from them)."""
    return module.k_proj(hidden_states)


#: The model's own attention forward serves every class (no copy): it projects, normalises (OLMo-2), rotates with its
#: own function (OLMo casts float32 cos/sin back), calls the slim cache's update and hf_slim's attention function.
ROUTE = AttentionRoute(rotary_parameter="position_embeddings", pre_norm_keys=_pre_norm_keys)


def _k_mode_refusal(module: torch.nn.Module) -> str | None:
    """Why ``V = f(K)`` is not exact in this layer, or None."""
    clip = getattr(module.config, "clip_qkv", None)
    if clip is not None:
        return f"clip_qkv={clip} clamps keys and values, so V is not a linear function of the cached keys"
    if getattr(module, "sliding_window", None) is not None:
        return f"sliding-window layer (window {module.sliding_window}): the slim cache keeps full-attention layers only"
    return None


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The self-attention module of every decoder layer."""
    return rope_attention_sites(
        model,
        ATTENTION_CLASSES,
        _projections,
        ROUTE,
        RotaryLayout("half"),
        k_mode_refusal=_k_mode_refusal,
    )


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The base model's forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the routed forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = route_contracts(
    ROUTE,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
    attributes=("k_proj", "v_proj", "layer_idx", "config"),
)
