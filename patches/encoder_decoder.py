"""Composites: ``VisionEncoderDecoderModel`` (TrOCR, Donut, Nougat, ViT+GPT-2 captioners),
``SpeechEncoderDecoderModel`` (wav2vec2/HuBERT + BART/mBART/GPT-2 decoders) and ``MusicgenForConditionalGeneration``
(T5 text encoder, EnCodec, MusicGen decoder).

A composite pairs an encoder with a causal-LM decoder that has cross-attention. Only the decoder keeps a cache, so
this module is a thin delegation: the sites and cache owners are those of the decoder's own patch module (chosen by
``config.decoder.model_type`` through the registry, which also gives the decoder's refusal reason), and the composite
itself gets the generate() override that keeps one encoder output per input under beam search.
"""

from __future__ import annotations

import torch
from transformers import MusicgenForConditionalGeneration, SpeechEncoderDecoderModel, VisionEncoderDecoderModel

from hf_slim.registry import SUPPORTED
from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionSite,
    InstancePatch,
    UnsupportedModelError,
    keep_one_encoder_output_per_input,
    speech_sample,
)

COMPOSITES = (VisionEncoderDecoderModel, SpeechEncoderDecoderModel, MusicgenForConditionalGeneration)


def _decoder_patch(model: torch.nn.Module) -> ArchitecturePatch:
    """The patch of the composite's decoder (the registry has already validated its config)."""
    if not isinstance(model, COMPOSITES):
        raise UnsupportedModelError(
            f"hf_slim cannot patch {type(model).__name__} as a composite; supported: "
            + ", ".join(cls.__name__ for cls in COMPOSITES)
        )
    return SUPPORTED[model.config.decoder.model_type].load()


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The decoder's sites: self-attention (slim cache) and cross-attention over the encoder output (no cache)."""
    return _decoder_patch(model).attention_sites(model.decoder)


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's cache owners (the composite passes the cache generate() prepared straight to its decoder)."""
    return _decoder_patch(model).cache_owners(model.decoder)


def extra_patches(model: torch.nn.Module) -> list[InstancePatch]:
    """Beam search keeps one encoder output per input (cross-attention folds the beams onto it)."""
    return [keep_one_encoder_output_per_input(model)]


@torch.no_grad()
def calibration_inputs(model: torch.nn.Module) -> dict:
    """Inputs for the K-mode calibration when the user gives none: the bundled speech sample (speech composites) or
    a random image (vision composites; pass real images as ``calibration_inputs`` for a meaningful calibration), and
    random decoder token ids.

    Returns ``{"pixel_values": (1, channels, size, size)}`` or ``{"input_values": (1, samples)}``, plus
    ``"decoder_input_ids": (1, 32)``, on the model's device.
    """
    if isinstance(model, MusicgenForConditionalGeneration):
        raise ValueError(
            "MusicGen has no default K-mode calibration batch: pass calibration_inputs with text input_ids and "
            "decoder_input_ids of shape (batch * num_codebooks, tokens), or use mode='input'"
        )
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    decoder_ids = torch.randint(0, model.config.decoder.vocab_size, (1, 32), generator=generator, device="cpu")
    inputs = {"decoder_input_ids": decoder_ids.to(parameter.device)}
    encoder = model.config.encoder
    if isinstance(model, SpeechEncoderDecoderModel):
        samples = speech_sample(16_000)
        inputs["input_values"] = torch.as_tensor(samples[None], device=parameter.device).to(dtype=parameter.dtype)
    else:
        size = encoder.image_size if isinstance(encoder.image_size, int) else encoder.image_size[0]
        pixels = torch.randn(1, encoder.num_channels, size, size, generator=generator, device="cpu")
        inputs["pixel_values"] = pixels.to(parameter.device, parameter.dtype)
    return inputs


def _decoder_contracts() -> tuple:
    """The composites run their decoder's patch: its contracts are theirs (those of absent classes do not apply)."""
    decoders = {SUPPORTED[model_type].patch_module: SUPPORTED[model_type] for model_type in SUPPORTED}
    return tuple(
        contract
        for architecture in decoders.values()
        if architecture.positions != "decoder" and architecture.load().composite_decoder
        for contract in architecture.load().contracts
    )


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=cache_owners,
    contracts=_decoder_contracts(),
    calibration_inputs=calibration_inputs,
    extra_patches=extra_patches,
)
