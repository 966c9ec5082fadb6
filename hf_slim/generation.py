"""generate() hooks: overrides shared by encoder-decoder patches (installed per instance through ``extra_patches``),
and the contracts of the generation internals hf_slim wraps (checked by slimify, see :mod:`hf_slim._compat`)."""

from __future__ import annotations

import torch
from transformers.generation.utils import GenerationMixin

from ._compat import Contract, generic_expand_inputs
from .patching import InstancePatch, PatchedMethod

#: ``api._prepare_slim_cache_for_generation`` reads ``generation_config`` and ``model_kwargs`` (positional in
#: generate()); :func:`expand_inputs_keeping_encoder_output` takes the arguments of the generic expansion.
CONTRACTS = (
    Contract(GenerationMixin, "_prepare_cache_for_generation", parameters=("generation_config", "model_kwargs")),
    Contract(
        GenerationMixin,
        "_expand_inputs_for_generation",
        parameters=("expand_size", "is_encoder_decoder", "input_ids"),
    ),
)


def keep_one_encoder_output_per_input(model: torch.nn.Module) -> InstancePatch:
    """Patch ``model._expand_inputs_for_generation`` so beam search keeps one encoder output per input."""
    return InstancePatch(
        model, "_expand_inputs_for_generation", PatchedMethod(expand_inputs_keeping_encoder_output, model)
    )


def expand_inputs_keeping_encoder_output(
    self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
):
    """Expand the decoder inputs for beams / returned sequences as transformers does, but not the encoder output.

    The encoder output ``E: (inputs, frames, d_model)`` stays one copy per input; the cross-attention maps the
    ``inputs * expand_size`` decoder rows onto it (:func:`hf_slim.attention.encoder_cross_attention`). transformers
    would repeat every tensor of ``encoder_outputs`` ``expand_size`` times (``repeat_interleave``: beams of one input
    are adjacent, which is the row order the folding assumes). The encoder's ``attention_mask`` stays unexpanded
    with it, so the cross-attention mask the model builds has one row per input too.
    """
    encoder_outputs = model_kwargs.pop("encoder_outputs", None)
    if expand_size == 1 or not is_encoder_decoder or encoder_outputs is None:
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return generic_expand_inputs(
            self, expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
    # the encoder's padding mask stays with the encoder output: one row per input, folded like E
    encoder_mask = model_kwargs.pop("attention_mask", None)
    input_ids, model_kwargs = generic_expand_inputs(
        self, expand_size=expand_size, is_encoder_decoder=False, input_ids=input_ids, **model_kwargs
    )
    model_kwargs["encoder_outputs"] = encoder_outputs
    if encoder_mask is not None:
        model_kwargs["attention_mask"] = encoder_mask
    return input_ids, model_kwargs
