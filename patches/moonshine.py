"""Moonshine (UsefulSensors' speech recognisers): an audio encoder and a text decoder whose self-attention rotates
queries and keys with RoPE on the first ``partial_rotary_factor`` of each head, in *interleaved* pairs (its
``rotate_half`` turns columns ``(0, 1), (2, 3), ...``), and whose cross-attention reads the encoder output.

One class, ``MoonshineAttention``, serves the encoder's self-attention (no cache: not patched), the decoder's
self-attention (the K cache, keys as the model rotated them) and its cross-attention (no cache: it reads the encoder
output ``generate()`` holds). Its forward routes through the attention interface on every tested release, so the
model's own forward is served (no copy). Its ``pad_head_dim_to_multiple_of`` pads the keys the cache returns before
the attention call: such configs are refused (:data:`hf_slim.registry.CONFIG_REFUSALS`).
"""

from __future__ import annotations

import torch
from transformers.models.moonshine.modeling_moonshine import MoonshineAttention, MoonshineDecoder

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Contract,
    InterleavedFrequencies,
    Projections,
    RotaryLayout,
    UnsupportedModelError,
    instances_of,
    interleaved_columns,
    one_encoder_output_per_input,
    route_contracts,
    speech_sample,
)

#: the sampling rate of the audio Moonshine reads (``input_values``)
_SAMPLING_RATE = 16000


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj)


SELF_ROUTE = AttentionRoute(rotary_parameter="position_embeddings", rotary_columns=interleaved_columns)
#: its forward views the keys it projects from the encoder output by the decoder batch (as UMT5): with beams over
#: one encoder output per input, the forward is handed that output repeated per decoder row
CROSS_ROUTE = AttentionRoute(encoder_parameter="key_value_states", expand_encoder=True)


def _decoders(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoders = instances_of(model, (MoonshineDecoder,))
    if not decoders:
        raise UnsupportedModelError(
            f"hf_slim cannot patch {type(model).__name__}: it has no Moonshine decoder (the encoder keeps no cache)"
        )
    return decoders


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Each decoder layer's self-attention (K cache, cos/sin recomputed from the decoder's own rotary module: the
    encoder has one too) and cross-attention (encoder output, no cache)."""
    sites = []
    for decoder in _decoders(model):
        heads, rotary = decoder.config.decoder_num_attention_heads, InterleavedFrequencies(decoder.rotary_emb)
        for layer in decoder.layers:
            self_site = AttentionSite.of(
                layer.self_attn,
                "self",
                _projections,
                SELF_ROUTE,
                num_heads=heads,
                rotary=RotaryLayout("interleaved"),
                rotary_source=rotary,
            )
            sites.append(self_site)
            sites.append(AttentionSite.of(layer.encoder_attn, "cross", _projections, CROSS_ROUTE, num_heads=heads))
    return sites


def calibration_inputs(model: torch.nn.Module, seconds: float = 2.0) -> dict:
    """The bundled speech sample (its first ``seconds``) and random decoder token ids for the K-mode calibration.

    Returns
    -------
    ``{"input_values": (1, samples), "decoder_input_ids": (1, 48)}`` on the model's device, audio in its dtype.
    """
    parameter = next(model.parameters())
    samples = speech_sample(_SAMPLING_RATE)
    audio = torch.as_tensor(samples[: int(seconds * _SAMPLING_RATE)], dtype=torch.float32, device=parameter.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=generator, device="cpu")
    return {
        "input_values": audio[None].to(parameter.dtype),  # (1, samples)
        "decoder_input_ids": ids.to(parameter.device),
    }


ATTRIBUTES = ("k_proj", "v_proj", "head_dim", "layer_idx", "config")
DECODER_ATTRIBUTES = ("rotary_emb", "layers", "config")

PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=_decoders,  # the decoder's forward creates EncoderDecoderCache(DynamicCache, DynamicCache)
    contracts=route_contracts(SELF_ROUTE, attention=(MoonshineAttention,), attributes=ATTRIBUTES)
    + route_contracts(CROSS_ROUTE, attention=(MoonshineAttention,), cache_owners=(MoonshineDecoder,))
    + (Contract(MoonshineDecoder, "forward", attributes=DECODER_ATTRIBUTES),),
    calibration_inputs=calibration_inputs,
    extra_patches=one_encoder_output_per_input,
)
