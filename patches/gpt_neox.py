"""GPT-NeoX (Pythia): RoPE on the first ``partial_rotary_factor`` (``rotary_pct``) of each head, one fused
``query_key_value`` projection whose output columns are laid out per head as ``[q_i | k_i | v_i]``."""

from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXModel

from hf_slim._compat import route_contracts
from hf_slim.projections import Projections, interleaved_qkv_projections
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionRoute, AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (GPTNeoXAttention,)
BASE_MODEL_CLASSES = (GPTNeoXModel,)


def _projections(module: torch.nn.Module) -> Projections:
    heads, head_dim = module.config.num_attention_heads, module.head_size
    return interleaved_qkv_projections(module.query_key_value, heads, head_dim)  # rows (h, q|k|v, dk)


#: The model's own attention forward (fused projection, partial RoPE, output projection) serves the class (no copy).
ROUTE = AttentionRoute(rotary_parameter="position_embeddings")


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The attention module of every layer."""
    return rope_attention_sites(
        model,
        ATTENTION_CLASSES,
        _projections,
        ROUTE,
        RotaryLayout("half"),
        head_dim=lambda module: module.head_size,
    )


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """GPTNeoXModel.forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the routed forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = route_contracts(
    ROUTE,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
    attributes=("query_key_value", "head_size", "layer_idx", "config"),
)
