"""GPT-Neo: learned absolute positions, separate bias-free ``q_proj``/``k_proj``/``v_proj``, unscaled scores, and
alternating global / local (windowed) layers.

Why the input cache applies: positions are added to the embeddings, and the local layers' window is a mask, not a
change of keys. GPT-Neo does not scale its scores (scale 1.0) and computes them in float32.

The window: each :class:`GPTNeoSelfAttention` owns a boolean ``bias`` buffer ``(1, 1, max_positions, max_positions)``,
causal for global layers and causal within the last ``window_size`` tokens for local ones, indexed by cache slot; its
``_attn`` slices it by key length (rows ``key_length - query_length .. key_length``). The slim paths read the rows of
the queries' cache slots as an additive bias (:func:`_window_bias`, ``ScoreBias.module``): prefill and chunked
prefill add them in :func:`hf_slim.bias.biased_eager_attention` (``_attn``'s arithmetic: float32 scores, unscaled),
the absorbed decode adds the same rows, so a slim cache keeps every token of a local layer, as transformers' own dynamic
cache does.

Static caches: the slim model gives the tokens of the unpatched model with its default *dynamic* cache. transformers'
own static cache cannot be the reference, it is wrong for GPT-Neo in 5.23.0: ``_attn`` then slices the window rows
by ``max_cache_len`` instead of the written length (transformers marks GPT-Neo as not compilable: "needs a hybrid
cache"). The slim path is right with either cache because the absorbed decode indexes the window rows by the queries'
slots, and :func:`hf_slim.attention.slim_self_attention` hands the prefill only the written slots of a static cache
(K/V and mask as long as a dynamic cache's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoModel, GPTNeoSelfAttention

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionSite,
    Projections,
    ScoreBias,
    additive_bias,
    attend_with_layer_bias,
    forward_contracts,
    instances_of,
    modules_of_type,
    split_heads,
)


def _projections(module: GPTNeoSelfAttention):
    return Projections.of(module.k_proj, module.v_proj)


def _window_bias(module: GPTNeoSelfAttention, owned: None, key_length: int, query_slots: torch.Tensor) -> torch.Tensor:
    """The module's causal/window mask rows (``owned``: None, the module's own ``bias`` buffer is read) of the
    queries' cache slots ``query_slots: (t,)`` over the first ``key_length`` slots, as an additive float32 bias
    ``(1, 1, t, key_length)`` (0 visible, dtype minimum hidden).

    Why by slot and not by key length as ``_attn`` slices them: the two agree for a dynamic cache (whose key length is
    the written length) but a static cache's key length is ``max_cache_len``. Slots past the buffer (a static cache
    longer than ``max_position_embeddings``) are hidden: no query can reach them (its own slot would be past it).
    """
    rows = module.bias[0, 0].index_select(0, query_slots.to(module.bias.device))  # (t, max_positions) bool
    bias = additive_bias(rows[:, :key_length])  # (t, min(key_length, max_positions))
    if bias.shape[-1] < key_length:
        bias = F.pad(bias, (0, key_length - bias.shape[-1]), value=torch.finfo(bias.dtype).min)
    return bias[None, None]  # (1, 1, t, key_length)


#: the window is a mask buffer the layer owns (``bias``), indexed by cache slot
WINDOW = ScoreBias.module(_window_bias)


# Adapted from transformers 5.23.0, models/gpt_neo/modeling_gpt_neo.py, GPTNeoSelfAttention.forward: the
# projections and the output projection are the model's own; the cache handling and the attention call change.
def slim_gpt_neo_attention_forward(
    self: GPTNeoSelfAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    query, key, value = (
        split_heads(projection(hidden_states), self.head_dim) for projection in (self.q_proj, self.k_proj, self.v_proj)
    )  # (b, h, t, dk)
    attn_output, attn_weights = attend_with_layer_bias(
        WINDOW, self, hidden_states, (query, key, value), cache, attention_mask,
        scale=1.0, upcast=True, dropout=self.attn_dropout.p,
    )  # fmt: skip
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (b, t, e)
    attn_output = self.resid_dropout(self.out_proj(attn_output))
    return attn_output, attn_weights


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every block (global and local alike: the window is the module's own mask)."""
    return [
        AttentionSite(
            module=module,
            kind="self",
            layer_idx=module.layer_id,
            num_heads=module.num_heads,
            head_dim=module.head_dim,
            projections=_projections,
            forward=slim_gpt_neo_attention_forward,
        )
        for module in instances_of(model, (GPTNeoSelfAttention,))
    ]


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(GPTNeoModel),  # GPTNeoModel.forward creates the cache when none is given
    contracts=forward_contracts(
        slim_gpt_neo_attention_forward, attention=(GPTNeoSelfAttention,), cache_owners=(GPTNeoModel,)
    ),
)
