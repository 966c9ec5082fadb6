"""Batched Whisper transcription: text, timestamped segments and language for a batch of audio clips.

Why: a bulk job decodes many files per generate() call, the batch the slim cache makes room for. Each clip's log-mel
features are computed on its own (so a clip's features never depend on what it is batched with), then:

- clips of at most 30 s share one short-form generate() call (Whisper pads every window to 30 s: batching adds no
  padding that batch 1 would not have);
- longer clips share one sequential long-form call (30 s windows, timestamps, as Whisper's own long-form
  transcription does), with an attention mask giving each clip's length; finished clips leave the batch.

With ``timestamps=True`` both kinds return segments with start and end times (what subtitles need); without, short
clips are decoded without timestamp tokens, as ``model.generate`` does by default. Beam search (``num_beams``)
keeps one encoder output per clip on a slim model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .budget import encoder_micro_batches

SAMPLING_RATE = 16_000
WINDOW_SECONDS = 30.0


@dataclass
class Segment:
    """A stretch of speech: times in seconds from the start of the clip."""

    start: float
    end: float
    text: str


@dataclass
class Transcription:
    """One clip's result: its text, its segments (with timestamps when asked for), the language the model
    transcribed (predicted by a multilingual model; an English-only model's is ``"en"``), the token ids it
    generated (timestamp tokens included, special tokens not) and the clip's duration."""

    text: str
    duration: float
    language: str | None = None
    segments: list[Segment] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def is_long(samples: np.ndarray) -> bool:
    """More than one 30 s Whisper window (sequential long-form transcription)."""
    return len(samples) > WINDOW_SECONDS * SAMPLING_RATE


def transcribe_batch(
    model,
    processor,
    clips: Sequence[np.ndarray],
    *,
    timestamps: bool = False,
    num_beams: int = 1,
    encoder_batch: int | None = None,
    max_new_tokens: int | None = None,
) -> list[Transcription]:
    """Transcribe mono 16 kHz ``clips`` (each ``(samples,)`` float32) in as few generate() calls as their lengths
    allow (one for the clips up to 30 s, one for the longer ones); results in the order of ``clips``.

    Parameters
    ----------
    model, processor:
        a Whisper model (slim or not) and its processor.
    timestamps:
        segments with start/end times (subtitles, JSON); long clips always get them (Whisper's long form needs them).
    num_beams:
        beam search width (1: greedy).
    encoder_batch:
        inputs per encoder call (:func:`hf_slim.budget.encoder_micro_batches`); None: the whole batch at once.
    max_new_tokens:
        limit per 30 s window (default: the generation config's, up to Whisper's 448 positions).
    """
    if not clips:
        return []
    results: list[Transcription | None] = [None] * len(clips)
    short = [i for i, clip in enumerate(clips) if not is_long(clip)]
    long = [i for i, clip in enumerate(clips) if is_long(clip)]
    settings = {"num_beams": num_beams} | ({"max_new_tokens": max_new_tokens} if max_new_tokens else {})
    context = encoder_micro_batches(model, encoder_batch) if encoder_batch else contextlib.nullcontext()
    with torch.inference_mode(), context:
        if short:
            batch = _transcribe(model, processor, [clips[i] for i in short], timestamps, long_form=False, **settings)
            for i, result in zip(short, batch, strict=True):
                results[i] = result
        if long:
            batch = _transcribe(model, processor, [clips[i] for i in long], True, long_form=True, **settings)
            for i, result in zip(long, batch, strict=True):
                results[i] = result
    return results  # type: ignore[return-value]


def _features(processor, clips: Sequence[np.ndarray], long_form: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_features: (batch, mels, frames), attention_mask: (batch, frames) or None)``, each clip's features
    computed on its own: 30 s windows (zero-padded audio) for short clips; for long ones the whole clip, padded here
    to the longest with a mask saying where each ends (generate never reads past it)."""
    extractor = processor.feature_extractor
    if not long_form:
        features = [
            extractor(clip, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features[0] for clip in clips
        ]
        return torch.stack(features), None
    features = [
        extractor(
            clip, sampling_rate=SAMPLING_RATE, return_tensors="pt", truncation=False, padding="longest"
        ).input_features[0]
        for clip in clips
    ]
    frames = max(feature.shape[-1] for feature in features)
    padded = features[0].new_zeros(len(features), features[0].shape[0], frames)  # where the features are
    mask = torch.zeros(len(features), frames, dtype=torch.long, device=padded.device)
    for row, feature in enumerate(features):
        padded[row, :, : feature.shape[-1]] = feature
        mask[row, : feature.shape[-1]] = 1
    return padded, mask


def _transcribe(model, processor, clips, timestamps: bool, *, long_form: bool, **settings) -> list[Transcription]:
    parameter = next(model.parameters())
    features, mask = _features(processor, clips, long_form)
    features = features.to(device=parameter.device, dtype=parameter.dtype)
    tokenizer = processor.tokenizer
    durations = [len(clip) / SAMPLING_RATE for clip in clips]
    if mask is not None:
        settings["attention_mask"] = mask.to(parameter.device)
    if not timestamps:
        out = model.generate(features, return_dict_in_generate=True, **settings)
        sequences = out.sequences  # (batch, init tokens + new tokens)
        return [
            Transcription(
                text=tokenizer.decode(row, skip_special_tokens=True).strip(),
                duration=duration,
                language=_language(model, row),
                token_ids=_content_ids(model, row),
            )
            for row, duration in zip(sequences, durations, strict=True)
        ]
    out = model.generate(features, return_timestamps=True, return_segments=True, **settings)
    results = []
    for row, (segments, duration) in enumerate(zip(out["segments"], durations, strict=True)):
        parts = [
            Segment(
                start=round(float(segment["start"]), 3),
                end=round(min(float(segment["end"]), duration), 3),
                text=tokenizer.decode(segment["tokens"], skip_special_tokens=True).strip(),
            )
            for segment in segments
        ]
        first = segments[0]["result"] if segments else None
        sequence = first if isinstance(first, torch.Tensor) else None
        results.append(
            Transcription(
                text=tokenizer.decode(out["sequences"][row], skip_special_tokens=True).strip(),
                duration=duration,
                language=_language(model, sequence) if sequence is not None else _language(model, None),
                segments=[part for part in parts if part.text],
                token_ids=_content_ids(model, out["sequences"][row]),
            )
        )
    return results


def _content_ids(model, sequence: torch.Tensor) -> list[int]:
    """The generated ids without the start tokens and padding (timestamp tokens are content: they place segments)."""
    config = model.generation_config
    special = {config.decoder_start_token_id, config.pad_token_id, config.eos_token_id, config.no_timestamps_token_id}
    special |= set((getattr(config, "lang_to_id", None) or {}).values())
    special |= set((getattr(config, "task_to_id", None) or {}).values())
    return [token for token in sequence.tolist() if token not in special]


def _language(model, sequence: torch.Tensor | None) -> str | None:
    """The language token the model generated (multilingual models), ``"en"`` for an English-only model."""
    config = model.generation_config
    lang_to_id = getattr(config, "lang_to_id", None) or {}
    if not getattr(config, "is_multilingual", bool(lang_to_id)):
        return "en"
    if sequence is None:
        return None
    by_id = {token_id: token.strip("<|>") for token, token_id in lang_to_id.items()}
    return next((by_id[token] for token in sequence.tolist()[:4] if token in by_id), None)
