"""FSMT (fairseq's WMT19 translation models, ``facebook/wmt19-en-de`` and the others): the decoder's self-attention
keeps a slim cache, cross-attention none.

Where things are: each decoder layer has ``self_attn`` and ``encoder_attn``, both FSMT's ``Attention``: BART's
attention written out by hand in the fairseq layout (transformers 5.15 to 5.25 compute it in the class, with no
attention interface and no SDPA path): time-first tensors ``(seq, batch, d_model)``, the query multiplied by
``head_dim ** -0.5`` before ``torch.bmm``, an additive causal ``attn_mask (new, keys)`` and a boolean
``key_padding_mask (batch, keys)`` (True at padding) whose scores it fills with the dtype's minimum, and the cache
passed as ``layer_state``. The slim forward transposes to batch-first, makes the two masks one additive mask and
runs the toolkit's :func:`~hf_slim.toolkit.prescaled_attention_forward` (TrOCR's and LED's).

``FSMTModel`` creates the cache, and with a cache it builds no decoder masks (generate() feeds one token per step):
the slim decode follows. With a static cache the unpatched FSMT therefore attends to the unfilled slots too (its
greedy tokens differ from its own dynamic cache's), which a slim cache (holding inputs, not keys) cannot reproduce:
the patch refuses ``cache_implementation="static"``. Positions: sinusoidal, added to the token embeddings, indexed by
the cache length, which a SlimCache reports the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.bart.modeling_bart import eager_attention_forward
from transformers.models.fsmt.modeling_fsmt import Attention, FSMTDecoder, FSMTModel

from hf_slim.toolkit import one_encoder_output_per_input, prescaled_attention_patch, token_calibration_inputs


def _time_first(attention: Callable) -> Callable:
    """FSMT's forward around the batch-first ``attention`` (:func:`~hf_slim.toolkit.prescaled_attention_forward`)."""

    # Adapted from transformers 5.23.0, models/fsmt/modeling_fsmt.py, Attention.forward (the same in 5.15 to 5.25):
    # its time-first inputs transposed and its two masks made one additive mask; the attention is the prescaled one.
    def slim_fsmt_attention_forward(
        self: Attention,
        query: torch.Tensor,
        key: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None = None,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``query: (new, batch, d_model)``; ``key``: the same (self-attention) or the encoder output ``(frames,
        inputs, d_model)`` (cross-attention, ``batch % inputs == 0``); ``key_padding_mask: (batch | inputs, keys)``,
        True at padding; ``attn_mask: (new, keys)``, additive. Returns ``(new, batch, d_model)`` and the weights
        ``(batch, heads, new, keys)`` or None."""
        if key_padding_mask is not None and key_padding_mask.dim() == 0:  # FSMT's "no mask" placeholder
            key_padding_mask = None
        mask = None if attn_mask is None else attn_mask[None, None]  # (1, 1, t, s)
        if key_padding_mask is not None:  # (b, 1, t|1, s): padded keys at the dtype's minimum, as FSMT fills them
            minimum = torch.finfo(query.dtype).min
            mask = torch.zeros((), dtype=query.dtype, device=query.device) if mask is None else mask
            mask = mask.masked_fill(key_padding_mask[:, None, None], minimum)
        encoder = key.transpose(0, 1) if self.encoder_decoder_attention else None  # (inputs, frames, d_model)
        output, weights = attention(self, query.transpose(0, 1), encoder, cache, mask, output_attentions)
        return output.transpose(0, 1), weights  # (t, b, d_model)

    return slim_fsmt_attention_forward


def calibration_inputs(model: torch.nn.Module) -> dict:
    """The default token batch (:func:`~hf_slim.toolkit.token_calibration_inputs`: ``(2, 64)`` source and target
    ids) with the source ids below ``src_vocab_size`` (FSMT's ``vocab_size`` is the target vocabulary's)."""
    inputs = token_calibration_inputs(model)
    return {**inputs, "input_ids": inputs["input_ids"] % model.config.src_vocab_size}


PATCH = prescaled_attention_patch(
    Attention,
    FSMTDecoder,
    eager_attention_forward,
    adapted=_time_first,
    cache_owner=FSMTModel,
    calibration_inputs=calibration_inputs,
    extra_patches=one_encoder_output_per_input,
    static_cache_refusal="with a cache, FSMTModel builds no decoder attention mask, so with a static cache the "
    "unpatched FSMT attends to the cache's unfilled slots (zero keys and values); a slim cache holds inputs, whose "
    "empty slots do not project to zero keys and values, so it cannot reproduce that: use the dynamic cache",
)
