"""CodeGen (CodeGen-Mono/Multi, CodeGen2): GPT-J's rotary layout (*interleaved* pairs on the first ``rotary_dim``
columns of each head, sin/cos rows of a fixed ``embed_positions`` table) behind one fused ``qkv_proj`` without bias,
whose output is laid out in ``mp_num`` (4) model-parallel shards of ``[q | v | k]`` (each ``embed_dim / mp_num``
wide, heads in order across the shards).

transformers 5.24 moved CodeGen's attention onto the attention interface (a model-level ``CodeGenRotaryEmbedding``
hands each layer ``position_embeddings = (sin, cos)``): there the model's own forward is served through the extension
points (no copy), with the K cache (RoPE rules out the input cache). Up to 5.23 the attention computes its own
rotation and runs its own ``_attn``; hf_slim has no adapted forward for it and refuses those releases cleanly
(:func:`attention_sites`). Which one applies is read from the installed forward (:data:`ROUTED`).
"""

from __future__ import annotations

import torch
from transformers.models.codegen.modeling_codegen import CodeGenAttention, CodeGenModel

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Projections,
    UnsupportedModelError,
    modules_of_type,
    route_contracts,
    routes_attention,
    sinusoid_columns,
    sinusoid_rope_sites,
)


def _projections(module: CodeGenAttention) -> Projections:
    """Key and value rows of the fused ``qkv_proj``, head-major: shard ``s`` holds ``[q | v | k]`` of its heads."""
    local = module.embed_dim // module.mp_num
    rows = torch.arange(3 * module.embed_dim, device=module.qkv_proj.weight.device).view(module.mp_num, 3, local)
    return Projections.of(module.qkv_proj, module.qkv_proj, rows[:, 2].reshape(-1), rows[:, 1].reshape(-1))  # (d, e)


#: transformers >= 5.24: the model's own attention forward calls the attention interface.
ROUTED = routes_attention(CodeGenAttention)
ROUTE = AttentionRoute(rotary_parameter="position_embeddings", rotary_columns=sinusoid_columns)


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The attention module of every block, rotated by the model's one ``CodeGenRotaryEmbedding``."""
    if not ROUTED:
        import transformers

        raise UnsupportedModelError(
            f"CodeGen computes attention itself in transformers {transformers.__version__} (its attention goes "
            "through the attention interface from 5.24 on, which hf_slim serves); install transformers>=5.24 or use "
            "the model unpatched"
        )
    return sinusoid_rope_sites(model, (CodeGenAttention,), _projections, ROUTE)


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(CodeGenModel),  # CodeGenModel.forward creates the cache when none is given
    contracts=route_contracts(
        ROUTE,
        attention=(CodeGenAttention,) if ROUTED else (),
        cache_owners=(CodeGenModel,),
        attributes=("qkv_proj", "mp_num", "embed_dim", "head_dim", "layer_idx", "config"),
    ),
    rotary_dim=lambda model: model.config.rotary_dim or model.config.n_embd // model.config.n_head,
)
