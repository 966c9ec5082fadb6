"""BLOOM: ALiBi positions and a fused, per-head-interleaved ``query_key_value`` linear.

Why the input cache applies: ALiBi adds ``slope_h * key_position`` to the scores (a per-head additive bias that does
not touch the keys), so ``scores_h = (q_h W_K,h^T) X^T * s + alibi_h`` holds exactly. BloomModel builds the ALiBi
tensor ``(batch * heads, 1, keys)`` once per forward from the 2-D attention mask (positions count real tokens, so
left padding is handled by the model) and hands it to every block; the absorbed decode adds the same rows.

The fused projection's output rows are ordered ``(heads, 3, head_dim)``: see
:func:`hf_slim.projections.interleaved_qkv_projections`. The attention residual (``dropout_add``) and the
tensor-parallel ``slow_but_exact`` output projection stay as in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bloom.modeling_bloom import BloomAttention, BloomModel, dropout_add

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionSite,
    ScoreBias,
    attend_with_layer_bias,
    forward_contracts,
    instances_of,
    interleaved_qkv_projections,
    modules_of_type,
    split_interleaved_qkv,
)


def _projections(module: BloomAttention):
    return interleaved_qkv_projections(module.query_key_value, module.num_heads, module.head_dim)


def _alibi_columns(module: BloomAttention, alibi: torch.Tensor, key_length: int, query_slots=None) -> torch.Tensor:
    """ALiBi as the scores see it, ``(b, h, 1, key_length)`` of ``alibi: (b * h, 1, n)`` (one column per cache slot:
    as long as the cache, a static one's too; the same for every query)."""
    return alibi.view(-1, module.num_heads, 1, alibi.shape[-1])[..., :key_length]


#: BLOOM's layer adds ALiBi from its ``alibi`` argument (every release up to 5.25 computes attention itself)
ALIBI = ScoreBias.argument("alibi", _alibi_columns)


def _output_projection(module: BloomAttention, context: torch.Tensor) -> torch.Tensor:
    """``dense``, or its tensor-parallel slices summed in order when ``slow_but_exact`` (as the model does)."""
    if module.pretraining_tp > 1 and module.slow_but_exact:
        slices = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(module.pretraining_tp):
            output = output + F.linear(
                context[:, :, int(i * slices) : int((i + 1) * slices)],
                module.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
            )
        return output
    return module.dense(context)


# Adapted from transformers 5.23.0, models/bloom/modeling_bloom.py, BloomAttention.forward: the fused projection, the
# output projection and the residual are the model's own; the cache handling and the attention call change.
def slim_bloom_attention_forward(
    self: BloomAttention,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor,
    cache=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, num_queries, _ = hidden_states.shape
    query, key, value = split_interleaved_qkv(self.query_key_value(hidden_states), self.num_heads, self.head_dim)
    context, probs = attend_with_layer_bias(
        ALIBI, self, hidden_states, (query, key, value), cache, attention_mask, alibi,
        scale=self.inv_norm_factor, upcast=False, dropout=self.attention_dropout.p,
    )  # fmt: skip
    context = context.reshape(batch, num_queries, -1)  # (b, t, e)
    output = dropout_add(_output_projection(self, context), residual, self.hidden_dropout, self.training)
    return output, probs


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every block."""
    return [
        AttentionSite.of(module, "self", _projections, slim_bloom_attention_forward)
        for module in instances_of(model, (BloomAttention,))
    ]


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(BloomModel),  # BloomModel.forward creates the cache when none is given
    contracts=forward_contracts(slim_bloom_attention_forward, attention=(BloomAttention,), cache_owners=(BloomModel,)),
)
