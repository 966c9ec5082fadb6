"""TrOCR: the text decoder of TrOCR checkpoints (``TrOCRForCausalLM``, usually inside a VisionEncoderDecoderModel).

Where things are: each decoder layer has ``self_attn`` (causal self-attention: slim input or K cache) and, when the
config is a decoder, ``encoder_attn`` (cross-attention over the image encoder's output E, whose width
``cross_attention_hidden_size`` may differ from ``hidden_size``: ``k_proj``/``v_proj`` map it to ``hidden_size``; the
absorbed query lives in that encoder width). Projections are ``nn.Linear`` with biases.

TrOCR specifics (transformers 5.15 to 5.25): its attention is written out by hand (``torch.bmm``, additive float
mask, softmax in the input dtype), with the query multiplied by ``head_dim ** -0.5`` before the dot product; the model
has no SDPA path. That arithmetic is BART's ``eager_attention_forward`` with scaling 1.0, which the slim prefill
runs. Positions are learned or sinusoidal absolute embeddings added to the token embeddings, indexed by the cache
length (which a SlimCache reports the same way): the input and encoder caches apply exactly.
"""

from __future__ import annotations

import torch
from transformers.models.bart.modeling_bart import eager_attention_forward
from transformers.models.trocr.modeling_trocr import TrOCRAttention, TrOCRDecoder

from hf_slim.toolkit import (
    DECODER_ATTENTION_READS,
    ArchitecturePatch,
    AttentionSite,
    Projections,
    decoder_attention,
    forward_contracts,
    modules_of_type,
    split_heads,
)


def _projections(module: TrOCRAttention) -> Projections:
    """``K = X @ W_K + b_K``, ``V = X @ W_V + b_V``, ``W: (kdim, hidden_size)``; nn.Linear stores the transpose."""
    return Projections.of(module.k_proj, module.v_proj)


# Adapted from transformers 5.23.0, models/trocr/modeling_trocr.py, TrOCRAttention.forward: the cache handling
# changes; the scaled query, the projections and the output projection are the model's own. Its attention arithmetic
# (bmm of the prescaled query, additive mask, softmax in the input dtype, dropout, bmm) is BART's
# eager_attention_forward with scaling 1.0, which runs it.
def slim_trocr_attention_forward(
    self: TrOCRAttention,
    hidden_states: torch.Tensor,
    key_value_states: torch.Tensor | None = None,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoder self-attention over a slim cache, or cross-attention over the encoder output with no cache.

    ``hidden_states: (batch, new, hidden_size)``; ``key_value_states``: the encoder output
    ``(inputs, frames, cross_attention_hidden_size)``, ``batch % inputs == 0``. Returns ``(batch, new, hidden_size)``
    and the weights ``(batch, heads, new, keys)`` when ``output_attentions``, else None.
    """

    def run_attention(query, key, value, mask):  # -> (b, t, h, dk), probabilities (b, h, t, s)
        return eager_attention_forward(self, query, key, value, mask, scaling=1.0, dropout=self.dropout)

    query = split_heads(self.q_proj(hidden_states) * self.scaling, self.head_dim)  # (b, h, t, dk)
    attn_output, attn_weights = decoder_attention(
        self,
        hidden_states,
        query,
        key_value_states,
        cache,
        attention_mask,
        1.0,
        run_attention,
        want_weights=bool(output_attentions),
        dropout=self.dropout if self.training else 0.0,
    )
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (b, t, e)
    return self.out_proj(attn_output), attn_weights if output_attentions else None


#: TrOCRDecoder.forward creates the cache when none is given
_decoders = modules_of_type(TrOCRDecoder)


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Each decoder layer's self-attention (slim cache) and cross-attention if it has one (encoder output)."""
    sites = []
    for decoder in _decoders(model):
        for layer in decoder.layers:
            sites.append(AttentionSite.of(layer.self_attn, "self", _projections, slim_trocr_attention_forward))
            if hasattr(layer, "encoder_attn"):
                sites.append(AttentionSite.of(layer.encoder_attn, "cross", _projections, slim_trocr_attention_forward))
    return sites


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=_decoders,
    contracts=forward_contracts(
        slim_trocr_attention_forward,
        attention=(TrOCRAttention,),
        cache_owners=(TrOCRDecoder,),
        also_reads=DECODER_ATTENTION_READS,
    ),
    composite_decoder=True,
)
