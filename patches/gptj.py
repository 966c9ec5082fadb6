"""GPT-J: RoPE on the first ``rotary_dim`` columns of each head with *interleaved* pairs (``rotate_every_two``), sin/cos
rows of a fixed ``embed_positions`` table, no projection biases.

transformers 5.24 rewrote GPT-J's attention onto the attention interface (a model-level ``GPTJRotaryEmbedding``
hands each layer ``position_embeddings = (sin, cos)``): there the model's own forward is served through the
extension points (:data:`ROUTE`, no copy). Up to 5.23 the attention computes its own rotation from its own
``embed_positions`` and runs its own eager ``_attn``: there :func:`slim_gptj_attention_forward` replaces it. Which
one applies is read from the installed forward's parameters (:data:`ROUTED`).
"""

from __future__ import annotations

import torch
from transformers.models.gptj.modeling_gptj import GPTJAttention, GPTJModel, apply_rotary_pos_emb

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Projections,
    RotaryLayout,
    ScoreBias,
    SinusoidPositions,
    attend_with_layer_bias,
    forward_contracts,
    modules_of_type,
    rope_attention_sites,
    route_contracts,
    routes_attention,
    sinusoid_columns,
    sinusoid_rope_sites,
    split_heads,
)


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj)  # (d, e); nn.Linear without bias


#: up to 5.23: GPT-J's own ``_attn`` (float32 scores, no score bias), as the eager attention of a layer with none
NO_BIAS = ScoreBias.module(None)

#: transformers >= 5.24: the model's own attention forward calls the attention interface and is served through the
#: extension points.
ROUTED = routes_attention(GPTJAttention)
ROUTE = AttentionRoute(rotary_parameter="position_embeddings", rotary_columns=sinusoid_columns)


# Adapted from transformers 5.23.0, models/gptj/modeling_gptj.py, GPTJAttention.forward: the cache update and the
# attention call go through the slim cache; projections, RoPE (sin/cos lookup included) and the output projection are
# the model's own. Used up to 5.23 (see ROUTED).
def slim_gptj_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    use_cache: bool | None = False,
    output_attentions: bool | None = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    heads = (self.num_attention_heads, self.head_dim)
    query = self.q_proj(hidden_states).unflatten(-1, heads)  # (b, t, h, dk)
    key = self.k_proj(hidden_states).unflatten(-1, heads)  # (b, t, h, dk)
    value = split_heads(self.v_proj(hidden_states), self.head_dim)  # (b, h, t, dk)
    embed_positions = self._get_embed_positions(position_ids)
    repeated_position_ids = position_ids.unsqueeze(-1).repeat(1, 1, embed_positions.shape[-1])
    sincos = torch.gather(embed_positions, 1, repeated_position_ids).to(key.dtype)  # (b, t, r)
    sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)  # (b, t, r/2) each
    rotated = self.rotary_dim or self.head_dim
    query = torch.cat([apply_rotary_pos_emb(query[..., :rotated], sin, cos), query[..., rotated:]], dim=-1)
    key = torch.cat([apply_rotary_pos_emb(key[..., :rotated], sin, cos), key[..., rotated:]], dim=-1)
    query, key = query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3)  # (b, h, t, dk)
    cos_sin = sinusoid_columns((sin, cos))  # the (cos, sin) each column was multiplied by, (b, t, r) each
    out, weights = attend_with_layer_bias(
        NO_BIAS, self, hidden_states, (query, key, value), cache, attention_mask,
        scale=1.0 / float(self.scale_attn), upcast=True, dropout=self.attn_dropout.p,
        rotary=cos_sin, position_ids=position_ids,
    )  # fmt: skip
    out = out.reshape(*out.shape[:-2], -1)  # (b, t, e)
    return self.resid_dropout(self.out_proj(out)), weights


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The attention module of every block: rotated by the model's one rotary module from 5.24, by each attention
    module's own ``embed_positions`` up to 5.23."""
    if ROUTED:
        return sinusoid_rope_sites(model, (GPTJAttention,), _projections, ROUTE)
    return rope_attention_sites(
        model,
        (GPTJAttention,),
        _projections,
        slim_gptj_attention_forward,
        RotaryLayout("interleaved"),
        rotary_source=SinusoidPositions,
    )


def rotary_dim(model: torch.nn.Module) -> int:
    """Width of the cos/sin table entries: ``rotary_dim`` (or the whole head)."""
    config = model.config
    return config.rotary_dim or config.n_embd // config.n_head


#: What the routed or the adapted forward relies on in transformers (checked by slimify; see hf_slim._compat).
if ROUTED:
    _CONTRACTS = route_contracts(
        ROUTE,
        attention=(GPTJAttention,),
        cache_owners=(GPTJModel,),
        attributes=("k_proj", "v_proj", "head_dim", "layer_idx", "config"),
    )
else:
    _CONTRACTS = forward_contracts(slim_gptj_attention_forward, attention=(GPTJAttention,), cache_owners=(GPTJModel,))

PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(GPTJModel),  # GPTJModel.forward creates the cache when none is given
    contracts=_CONTRACTS,
    rotary_dim=rotary_dim,
)
