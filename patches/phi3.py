"""Phi-3 / Phi-3.5: RoPE (default or longrope with short/long factors), fused ``qkv_proj`` (rows ``[q | k | v]``).

Longrope switches from the short to the long factors once a forward sees a position past
``original_max_position_embeddings``; the slim cache keeps each token's cos/sin as it was written, so keys rotated
with the short factors stay un-rotated with them (:mod:`hf_slim.rope`). ``sliding_window`` is handled by the model's
own mask and attention interface.
"""

from __future__ import annotations

import torch
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3Model

from hf_slim._compat import route_contracts
from hf_slim.projections import Projections
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionRoute, AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (Phi3Attention,)
BASE_MODEL_CLASSES = (Phi3Model,)


def _projections(module: torch.nn.Module) -> Projections:
    e = module.config.num_attention_heads * module.head_dim
    return Projections.of(module.qkv_proj, module.qkv_proj, slice(e, 2 * e), slice(2 * e, None))  # qkv: [Q | K | V]


#: The model's own attention forward (fused projection, RoPE, sliding-window argument, output projection) serves
#: the class (no copy).
ROUTE = AttentionRoute(rotary_parameter="position_embeddings")


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The self-attention module of every decoder layer."""
    return rope_attention_sites(model, ATTENTION_CLASSES, _projections, ROUTE, RotaryLayout("half"))


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Phi3Model.forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the routed forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = route_contracts(
    ROUTE,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
    attributes=("qkv_proj", "head_dim", "layer_idx", "config"),
)
