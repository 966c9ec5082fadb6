"""MPT: ALiBi positions, a fused bias-free ``Wqkv`` linear laid out ``[Q | K | V]`` (like GPT-2's ``c_attn``).

Why the input cache applies: ALiBi is an additive per-head score bias. MptModel builds one tensor
``(heads, 1, max_seq_len)`` holding ``slope_h * (j - (max_seq_len - 1))`` and each attention call keeps its last
``key_length`` columns, i.e. the bias is relative to the newest key (softmax is shift invariant per row); the absorbed
decode adds the same columns (:func:`_alibi_bias`).

``attn_config.clip_qkv`` clamps the fused projection, which is not linear: neither the input cache nor the K cache can
reproduce clamped keys/values, so such configs are refused in :data:`hf_slim.registry.CONFIG_REFUSALS`.

MPT's mask is boolean with True meaning *masked* (``create_causal_mask(...).to(torch.bool)`` of an additive mask); the
shared slim steps take True as *visible*, so the forward inverts it once and :func:`_own_attention` inverts it back.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mpt.modeling_mpt import MptAttention, MptModel

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionSite,
    Projections,
    ScoreBias,
    attend_with_layer_bias,
    forward_contracts,
    instances_of,
    modules_of_type,
    split_heads,
)


def _projections(module: MptAttention) -> Projections:
    e = module.hidden_size
    return Projections.of(module.Wqkv, module.Wqkv, slice(e, 2 * e), slice(2 * e, None))  # Wqkv rows [Q | K | V]


def _alibi_bias(
    module: MptAttention, alibi: torch.Tensor, key_length: int, query_slots: torch.Tensor | None = None
) -> torch.Tensor:
    """The last ``key_length`` ALiBi columns, ``(1, h, 1, key_length)``, as MptAttention.forward slices them
    (relative to the last slot for every query: ``query_slots`` are not needed, softmax is shift invariant)."""
    return alibi[None, :, :, max(0, alibi.shape[-1] - key_length) :]


#: MPT's layer adds ALiBi from its ``position_bias`` argument (every release up to 5.25 computes attention itself)
ALIBI = ScoreBias.argument("position_bias", _alibi_bias)


# Adapted from transformers 5.23.0, models/mpt/modeling_mpt.py, MptAttention.forward: the fused projection and the
# output projection are the model's own; the cache handling and the attention call change.
def slim_mpt_attention_forward(
    self: MptAttention,
    hidden_states: torch.Tensor,
    position_bias: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if self.clip_qkv:  # refused by the registry; a config edited after slimify must not run silently wrong
        raise RuntimeError("clip_qkv was set after slimify: the slim cache cannot reproduce clamped keys/values")
    query, key, value = self.Wqkv(hidden_states).chunk(3, dim=2)  # (b, t, e) each
    query, key, value = (split_heads(x, self.head_dim) for x in (query, key, value))  # (b, h, t, dk)
    visible = None if attention_mask is None else ~attention_mask
    context, probs = attend_with_layer_bias(
        ALIBI, self, hidden_states, (query, key, value), cache, visible, position_bias,
        scale=self.softmax_scale, upcast=False, dropout=self.attn_dropout_p,
    )  # fmt: skip
    context = context.reshape(*hidden_states.shape[:-1], -1)  # (b, t, e)
    return self.out_proj(context), probs


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every block."""
    return [
        AttentionSite.of(
            module, "self", _projections, slim_mpt_attention_forward, num_heads=module.n_heads, head_dim=module.head_dim
        )
        for module in instances_of(model, (MptAttention,))
    ]


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(MptModel),  # MptModel.forward creates the cache when none is given
    contracts=forward_contracts(slim_mpt_attention_forward, attention=(MptAttention,), cache_owners=(MptModel,)),
)
