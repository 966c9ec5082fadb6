"""Phi-2 (``phi``) and StableLM (``stablelm``): RoPE on the first ``partial_rotary_factor`` of each head, separate
``q_proj``/``k_proj``/``v_proj`` with biases (StableLM: ``use_qkv_bias``).

The un-rotated tail of each head passes through the cache as it is. ``qk_layernorm`` normalises each head's keys per
token, so ``V = f(K)`` is not exact there: refused per layer (the layer keeps the model's own K and V).
"""

from __future__ import annotations

import torch
from transformers.models.phi.modeling_phi import PhiAttention, PhiModel
from transformers.models.stablelm.modeling_stablelm import StableLmAttention, StableLmModel

from hf_slim._compat import route_contracts
from hf_slim.projections import Projections
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionRoute, AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (PhiAttention, StableLmAttention)
BASE_MODEL_CLASSES = (PhiModel, StableLmModel)


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj)


#: The model's own attention forward (projections, partial RoPE, output projection) serves both classes (no copy).
ROUTE = AttentionRoute(rotary_parameter="position_embeddings")


def _k_mode_refusal(module: torch.nn.Module) -> str | None:
    if module.qk_layernorm:
        return "qk_layernorm normalises each head's keys per token, so V is not a linear function of the cached keys"
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
    attributes=("k_proj", "v_proj", "layer_idx", "config", "qk_layernorm"),
)
