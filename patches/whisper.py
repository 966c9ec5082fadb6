"""Whisper: decoder self-attention keeps one slim tensor per token, cross-attention keeps no cache at all.

Covers WhisperForConditionalGeneration (``generate``, short-form and sequential long-form, beams, timestamps, the
ASR pipeline) and WhisperModel, eager and SDPA attention. The encoder's self-attention has no cache and stays
untouched; the sites are each decoder layer's ``self_attn`` (input or K cache) and ``encoder_attn`` (absorbed
attention over the encoder output E, which generate() already holds).

Whisper specifics:

* No forward is copied: WhisperAttention's own forward runs, served through the extension points
  (:mod:`hf_slim.interface`). ``q_proj`` output is multiplied by ``head_dim ** -0.5`` before the dot product and the
  attention call uses ``scaling=1.0``; ``k_proj`` has no bias.
* Beam search: transformers repeats E once per beam (``_expand_inputs_for_generation``). The slim model keeps one
  copy per input and :func:`hf_slim.cross_attention.encoder_cross_attention` folds each input's beams onto it, so
  neither a cross-attention cache nor beam copies of E exist.
* ``WhisperGenerationMixin._postprocess_outputs`` / ``_stack_split_outputs`` split and re-stack the returned cache by
  reading ``layers[i].keys``; the slim model splits and stacks its slim tensors instead.
"""

from __future__ import annotations

import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperDecoder, WhisperDecoderLayer

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Contract,
    EncoderOutputCache,
    InstancePatch,
    PatchedMethod,
    Projections,
    SlimCache,
    UnsupportedModelError,
    cache_entry,
    cache_parameter,
    expand_inputs_keeping_encoder_output,
    instances_of,
    route_contracts,
    self_attention_part,
    speech_sample,
)

#: Whisper classes slimify accepts, and the ones it refuses with the reason.
SUPPORTED_CLASSES = (WhisperForConditionalGeneration, WhisperModel)
REFUSED_CLASSES = {
    "WhisperForCausalLM": "the decoder-only Whisper (a speculative-decoding assistant) converts any cache it is given "
    "into a K/V EncoderDecoderCache when it sees encoder states; it is not supported yet",
    "WhisperForAudioClassification": "encoder-only model: it keeps no KV cache, so there is nothing to slim",
    "WhisperEncoder": "encoder-only model: it keeps no KV cache, so there is nothing to slim",
    "WhisperDecoder": "slimify the WhisperModel or WhisperForConditionalGeneration that holds this decoder",
}

#: The model's own WhisperAttention.forward (scaled query, projections, output projection) serves decoder self- and
#: cross-attention (no copy); the encoder output arrives as ``key_value_states``.
ROUTE = AttentionRoute(encoder_parameter="key_value_states")

#: What the routed forward and the generate() hooks rely on in transformers (checked by slimify, see hf_slim._compat).
_CONTRACTS = (
    *route_contracts(
        ROUTE,
        attention=(WhisperAttention,),
        cache_owners=(WhisperDecoder,),
        attributes=("k_proj", "v_proj", "head_dim", "num_heads", "layer_idx", "config"),
    ),
    Contract(
        WhisperForConditionalGeneration,
        "_postprocess_outputs",
        parameters=(
            "seek_outputs",
            "decoder_input_ids",
            "return_token_timestamps",
            "generation_config",
            "is_shortform",
            "seek",
            "batch_idx_map",
        ),
    ),
    Contract(
        WhisperForConditionalGeneration,
        "_stack_split_outputs",
        parameters=("seek_outputs", "model_output_type", "device", "kwargs"),
    ),
)

#: Whisper's fixed audio front end: 16 kHz, 10 ms hop (160 samples), two encoder frames per output position.
_SAMPLING_RATE, _HOP_LENGTH, _CONV_STRIDE = 16_000, 160, 2


def _projections(module: WhisperAttention) -> Projections:
    """``K = X @ W_K`` (no bias), ``V = X @ W_V + b_V``; nn.Linear stores ``(out, in)`` so the views are transposed."""
    return Projections.of(module.k_proj, module.v_proj)


def _decoders(model: torch.nn.Module) -> list[WhisperDecoder]:
    if not isinstance(model, SUPPORTED_CLASSES):
        name = type(model).__name__
        reason = REFUSED_CLASSES.get(name, "not a Whisper encoder-decoder model")
        raise UnsupportedModelError(
            f"hf_slim cannot patch {name}: {reason}. Supported Whisper classes: "
            + ", ".join(cls.__name__ for cls in SUPPORTED_CLASSES)
        )
    return instances_of(model, (WhisperDecoder,))


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Each decoder layer's self-attention (slim cache) and cross-attention (encoder output, no cache)."""
    sites = []
    for decoder in _decoders(model):
        for layer in decoder.layers:
            if not isinstance(layer, WhisperDecoderLayer):
                continue
            for kind, module in (("self", layer.self_attn), ("cross", layer.encoder_attn)):
                sites.append(AttentionSite.of(module, kind, _projections, ROUTE))
    return sites


def extra_patches(model: torch.nn.Module) -> list[InstancePatch]:
    """generate() of WhisperForConditionalGeneration: E stays one copy per input, and outputs split slim caches."""
    if not isinstance(model, WhisperForConditionalGeneration):
        return []
    return [
        InstancePatch(model, name, PatchedMethod(function, model))
        for name, function in (
            ("_expand_inputs_for_generation", expand_inputs_keeping_encoder_output),
            ("_postprocess_outputs", _postprocess_slim_outputs),
            ("_stack_split_outputs", _stack_split_slim_outputs),
        )
    ]


def _slim_self_cache(cache) -> SlimCache | None:
    """The SlimCache inside a cache returned by generate(), or None for any other cache."""
    inner = self_attention_part(cache)
    return inner if isinstance(inner, SlimCache) else None


def _slim_cache_from_layers(states: list[torch.Tensor | None]) -> EncoderDecoderCache:
    """An encoder-decoder slim cache whose self-attention layers hold ``states`` (each ``(batch, seq, width)``)."""
    cache = SlimCache(len(states))
    for layer_idx, layer_states in enumerate(states):
        if layer_states is not None:
            cache.update_slim(layer_states, layer_idx)
    return EncoderDecoderCache(cache, EncoderOutputCache())


# Adapted from transformers 5.23.0, models/whisper/generation_whisper.py, WhisperGenerationMixin._postprocess_outputs
# (split_by_batch_index, the cache branch: one row of every layer, on the CPU; none for long-form).
def _cache_row(slim: SlimCache, row: int, is_shortform: bool) -> EncoderDecoderCache | None:
    """Row ``row`` of a generate() output's slim cache, as transformers keeps one row of a K/V cache per sequence."""
    if not is_shortform:  # transformers: "too costly for longform"
        return None
    return _slim_cache_from_layers(
        [None if layer.states is None else layer.states[row][None].cpu() for layer in slim.layers]
    )


# Adapted from transformers 5.23.0, models/whisper/generation_whisper.py, WhisperGenerationMixin._stack_split_outputs
# (the cache branch: every layer's rows concatenated, on the output device).
def _stacked_cache(caches: list, device) -> EncoderDecoderCache:
    """One slim cache of the per-sequence caches :func:`_cache_row` made, rows in order."""
    layers = zip(*(_slim_self_cache(cache).layers for cache in caches), strict=True)
    return _slim_cache_from_layers(
        [None if rows[0].states is None else torch.cat([r.states for r in rows]).to(device) for rows in layers]
    )


def _postprocess_slim_outputs(
    self, seek_outputs, decoder_input_ids, return_token_timestamps, generation_config, is_shortform, seek, batch_idx_map
):
    """Per-sequence outputs of one generate() call: transformers' own ``_postprocess_outputs`` on the outputs without
    the slim cache (its split reads K/V), then each sequence's row of the slim cache (:func:`_cache_row`)."""
    original = type(self)._postprocess_outputs
    key, cache = (None, None) if isinstance(seek_outputs, torch.Tensor) else cache_entry(seek_outputs)
    slim = _slim_self_cache(cache)
    if slim is not None:  # transformers would split it reading K/V: hand it the outputs without the cache
        seek_outputs = type(seek_outputs)(**{k: v for k, v in seek_outputs.items() if k != key})
    result = original(
        self,
        seek_outputs,
        decoder_input_ids,
        return_token_timestamps,
        generation_config,
        is_shortform,
        seek,
        batch_idx_map,
    )
    if slim is None:
        return result
    sequence_tokens, split = result
    for row, outputs in enumerate(split):
        outputs[key] = _cache_row(slim, row, is_shortform)
    return sequence_tokens, split


def _stack_split_slim_outputs(self, seek_outputs, model_output_type, device, kwargs):
    """Stack the per-sequence outputs of :func:`_postprocess_slim_outputs` back into one generate() output:
    transformers' own ``_stack_split_outputs`` without the slim caches, then those stacked (:func:`_stacked_cache`)."""
    original = type(self)._stack_split_outputs
    key, first = cache_entry(seek_outputs[0]) if seek_outputs else (None, None)
    if _slim_self_cache(first) is None:
        return original(self, seek_outputs, model_output_type, device, kwargs)
    caches = [outputs[key] for outputs in seek_outputs]
    without_cache = [{k: v for k, v in outputs.items() if k != key} for outputs in seek_outputs]
    stacked = original(self, without_cache, model_output_type, device, kwargs)
    stacked[key] = _stacked_cache(caches, device)
    return stacked


@torch.no_grad()
def calibration_inputs(model: torch.nn.Module, max_tokens: int = 48) -> dict:
    """Real speech for the K-mode calibration: the bundled sample WAV and the model's own greedy transcript of it.

    Why: the K cache error depends on the activations (random ones understate it 3-10x); the decoder self-attention
    inputs of a real transcript of real audio, computed in the model's dtype, are what the calibration should see.

    Returns
    -------
    ``{"input_features": (1, num_mel_bins, 2 * max_source_positions), "decoder_input_ids": (1, tokens)}`` on the
    model's device, features in the model's dtype.
    """
    config = model.config
    parameter = next(model.parameters())
    samples = speech_sample(_SAMPLING_RATE)
    extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=_SAMPLING_RATE, hop_length=_HOP_LENGTH
    )
    num_samples = _CONV_STRIDE * config.max_source_positions * _HOP_LENGTH
    features = extractor(
        samples, sampling_rate=_SAMPLING_RATE, max_length=num_samples, return_tensors="pt"
    ).input_features.to(device=parameter.device, dtype=parameter.dtype)  # (1, mel, 2 * max_source_positions)

    whisper = model.model if isinstance(model, WhisperForConditionalGeneration) else model
    encoder_states = whisper.encoder(features).last_hidden_state  # (1, frames, d_model)
    output_embeddings = whisper.decoder.embed_tokens.weight  # Whisper ties the LM head to the token embeddings
    tokens = [config.decoder_start_token_id]
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    cache_name = cache_parameter(type(whisper.decoder).forward)
    step = torch.tensor([tokens], device=parameter.device)
    for _ in range(min(max_tokens, config.max_target_positions) - 1):
        hidden = whisper.decoder(
            input_ids=step, encoder_hidden_states=encoder_states, use_cache=True, **{cache_name: cache}
        ).last_hidden_state[:, -1]  # (1, d_model)
        token = int((hidden @ output_embeddings.T).argmax(-1))
        if token == config.eos_token_id:
            break
        tokens.append(token)
        step = torch.tensor([[token]], device=parameter.device)
    return {"input_features": features, "decoder_input_ids": torch.tensor([tokens], device=parameter.device)}


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=_decoders,  # WhisperDecoder.forward creates the (self + cross) cache when none is given
    contracts=_CONTRACTS,
    calibration_inputs=calibration_inputs,
    extra_patches=extra_patches,
)
