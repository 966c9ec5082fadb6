"""GPTBigCode (SantaCoder, StarCoder layouts) with ``multi_query=False``: multi-head attention, learned absolute
positions, one fused ``c_attn`` linear whose output columns are laid out per head as ``[q_i | k_i | v_i]``.

Positions are added to the embeddings, so the input cache applies exactly. ``multi_query=True`` (one shared K/V head)
and ``add_cross_attention=True`` are refused in :data:`hf_slim.registry.CONFIG_REFUSALS`. No forward is copied:
GPTBigCodeAttention's own forward runs (it calls the attention interface in every tested release), served through
the extension points (:mod:`hf_slim.interface`).
"""

from __future__ import annotations

from transformers.models.gpt_bigcode.modeling_gpt_bigcode import GPTBigCodeAttention, GPTBigCodeModel

from hf_slim.toolkit import Projections, interleaved_qkv_projections, routed_family


def _projections(module: GPTBigCodeAttention) -> Projections:
    return interleaved_qkv_projections(module.c_attn, module.num_heads, module.head_dim)  # rows (h, q|k|v, dk)


#: The model's own forward (fused c_attn split per head, c_proj) serves GPTBigCodeAttention (no copy).
PATCH = routed_family(
    attention=(GPTBigCodeAttention,),
    base_models=(GPTBigCodeModel,),
    projections=_projections,
    attributes=("c_attn", "num_heads", "head_dim", "layer_idx", "config"),
)
