"""OPT, XGLM and BioGPT: the "Attention Is All You Need" decoder attention with separate ``q_proj``/``k_proj``/
``v_proj``/``out_proj`` linears (biases optional), positions added to the embeddings before the first layer.

The three classes are copies of one another up to two facts, kept in :data:`FAMILY`:

* where the score scale goes: OPT and XGLM multiply the query by ``head_dim ** -0.5`` right after ``q_proj`` and
  attend with scale 1.0; BioGPT scales inside the attention call;
* which attention call runs: OPT and BioGPT dispatch through transformers' attention interfaces (eager, SDPA); XGLM
  has only its own eager bmm code (it supports no other implementation), reproduced in :func:`_xglm_eager_attention`.

Positions never reach attention (OPT's learned positions with their offset of 2, BioGPT's learned positions, XGLM's
sinusoids are all added to the embeddings), so the input cache applies exactly. OPT-350m's ``project_in``/
``project_out`` (``word_embed_proj_dim != hidden_size``) and post-layer-norm (``do_layer_norm_before=False``) sit
outside attention: the cached tensor is whatever the attention module receives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.biogpt.modeling_biogpt import BioGptAttention, BioGptModel
from transformers.models.biogpt.modeling_biogpt import eager_attention_forward as biogpt_eager
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoder
from transformers.models.opt.modeling_opt import eager_attention_forward as opt_eager
from transformers.models.xglm.modeling_xglm import XGLMAttention, XGLMModel

from hf_slim._compat import forward_contracts
from hf_slim.attention import Projections, slim_self_attention, split_heads
from hf_slim.sites import AttentionSite, token_calibration_inputs


@dataclass(frozen=True)
class Family:
    """How one attention class of this family scales and attends.

    Attributes
    ----------
    query_prescaled:
        the forward multiplies ``q_proj(x)`` by ``module.scaling`` and attends with scale 1.0.
    eager:
        the eager attention function of the class's modeling file, or None for XGLM's own bmm code.
    """

    query_prescaled: bool
    eager: Callable | None


FAMILY: dict[type, Family] = {
    OPTAttention: Family(query_prescaled=True, eager=opt_eager),
    XGLMAttention: Family(query_prescaled=True, eager=None),
    BioGptAttention: Family(query_prescaled=False, eager=biogpt_eager),
}
#: the modules whose forward creates the cache when none is given
CACHE_OWNERS = (OPTDecoder, XGLMModel, BioGptModel)


def _projections(module: nn.Module):
    return Projections.of(module.k_proj, module.v_proj)


# Adapted from transformers 5.23.0, models/xglm/modeling_xglm.py, XGLMAttention.forward (the score/softmax part):
# scores of the prescaled query, additive mask clamped at the dtype minimum, softmax upcast to fp32 for fp16 only.
def _xglm_eager_attention(module: XGLMAttention, query, key, value, mask):
    """XGLM's own attention: ``query, key, value: (b, h, t|n, dk)`` -> ``((b, t, h, dk), weights (b, h, t, n))``."""
    weights = torch.matmul(query, key.transpose(-1, -2))  # (b, h, t, n)
    if mask is not None:
        weights = weights + mask
        weights = torch.max(weights, torch.full((), torch.finfo(weights.dtype).min, device=weights.device))
    if weights.dtype == torch.float16:
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(torch.float16)
    else:
        weights = nn.functional.softmax(weights, dim=-1)
    probs = nn.functional.dropout(weights, p=module.dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2), weights  # (b, t, h, dk)


def _attention_runner(module: nn.Module, scale: float, kwargs: dict):
    """The model's own attention call for this class, as its forward makes it."""
    family = FAMILY[type(module)]
    if family.eager is None:
        return functools.partial(_xglm_eager_attention, module)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, family.eager)
    dropout = module.dropout if module.training else 0.0

    def run(query, key, value, mask):
        return interface(module, query, key, value, mask, dropout=dropout, scaling=scale, **kwargs)

    return run


def _wants_weights(module: nn.Module) -> bool:
    config = getattr(module, "config", None)  # XGLMAttention keeps no config: it is eager-only
    return config is None or config._attn_implementation == "eager"


# Adapted from transformers 5.23.0, models/opt/modeling_opt.py OPTAttention.forward, models/xglm/modeling_xglm.py
# XGLMAttention.forward and models/biogpt/modeling_biogpt.py BioGptAttention.forward (self-attention branch): the
# projections and the output projection are the model's own; the cache handling and the attention call change.
def slim_opt_family_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    key_value_states: torch.Tensor | None = None,
    past_key_values=None,
    attention_mask: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if key_value_states is not None:
        raise NotImplementedError(f"hf_slim patches {type(self).__name__} as causal self-attention only")
    kwargs.pop("position_ids", None)
    family = FAMILY[type(self)]
    query = self.q_proj(hidden_states)  # (b, t, e)
    if family.query_prescaled:
        query = query * self.scaling
    scale = 1.0 if family.query_prescaled else self.scaling
    query, key, value = (
        split_heads(x, self.head_dim) for x in (query, self.k_proj(hidden_states), self.v_proj(hidden_states))
    )  # (b, h, t, dk)
    attn_output, attn_weights = slim_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        past_key_values,
        attention_mask,
        scale,
        _attention_runner(self, scale, kwargs),
        want_weights=_wants_weights(self),
    )
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (b, t, e)
    return self.out_proj(attn_output), attn_weights


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every decoder layer."""
    return [
        AttentionSite.of(module, "self", _projections, slim_opt_family_attention_forward)
        for module in model.modules()
        if type(module) in FAMILY
    ]


def cache_owners(model: nn.Module) -> list[nn.Module]:
    """OPTDecoder / XGLMModel / BioGptModel create the cache when none is given."""
    return [module for module in model.modules() if isinstance(module, CACHE_OWNERS)]


#: token ids for the K-mode calibration when the user gives none
default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(slim_opt_family_attention_forward, attention=tuple(FAMILY), cache_owners=CACHE_OWNERS)
