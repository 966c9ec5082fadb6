"""Batched Whisper transcription: text, timestamped segments, word timings and language for a batch of audio clips.

Why: a bulk job decodes many files per generate() call, the batch the slim cache makes room for. Each clip's log-mel
features are computed on its own (so a clip's features never depend on what it is batched with), then:

- clips of at most 30 s share one short-form generate() call (Whisper pads every window to 30 s: batching adds no
  padding that batch 1 would not have);
- longer clips share one sequential long-form call (30 s windows, timestamps, as Whisper's own long-form
  transcription does), with an attention mask giving each clip's length; finished clips leave the batch.

With ``timestamps=True`` both kinds return segments with start and end times (what subtitles need); without, short
clips are decoded without timestamp tokens, as ``model.generate`` does by default. Beam search (``num_beams``)
keeps one encoder output per clip on a slim model.

The decoding options (:class:`WhisperOptions`) are those of transformers' ``WhisperForConditionalGeneration.generate``
(language, task, prompt, conditioning on previous text, temperature fallback, token-level timestamps from the
cross-attention alignment heads), passed through unchanged: hf_slim adds no decoding logic of its own, so a slim
model's outputs are the unpatched model's for every option.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .budget import encoder_micro_batches

SAMPLING_RATE = 16_000
WINDOW_SECONDS = 30.0
#: output formats whose files carry timestamped segments
TIMED_FORMATS = ("srt", "vtt", "json")


@dataclass
class Word:
    """One word and its time span in seconds from the start of the clip (from the cross-attention alignment)."""

    start: float
    end: float
    word: str


@dataclass
class Segment:
    """A stretch of speech: times in seconds from the start of the clip; its words when word timestamps were asked
    for."""

    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcription:
    """One clip's result: its text, its segments (with timestamps when asked for), the language the model
    transcribed (predicted by a multilingual model unless given; an English-only model's is ``"en"``), the token ids
    it generated (timestamp tokens included, special tokens not) and the clip's duration."""

    text: str
    duration: float
    language: str | None = None
    segments: list[Segment] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class WhisperOptions:
    """How Whisper decodes: each field is the ``WhisperForConditionalGeneration.generate`` argument of (about) the
    same name, as faster-whisper, WhisperX and the transformers ASR pipeline users pass them.

    Attributes
    ----------
    timestamps:
        segments with start/end times (subtitles, JSON); long clips always get them (Whisper's long form needs them).
    word_timestamps:
        each segment's words with their times (``return_token_timestamps``: dynamic time warping over the
        cross-attention weights of the generation config's ``alignment_heads``); implies ``timestamps``.
    num_beams:
        beam search width (1: greedy).
    max_new_tokens:
        limit per 30 s window (default: the generation config's, up to Whisper's 448 positions).
    language, task:
        a multilingual model's language (code such as ``"fr"`` or name such as ``"french"``; default: detected per
        clip) and task (``"transcribe"`` or ``"translate"``, to English). An English-only model takes ``"en"`` and
        ``"transcribe"`` only.
    prompt:
        text the model is told came before (``prompt_ids``): names, spelling, style.
    condition_on_previous_text:
        long form: each window is conditioned on the text of the previous one (``condition_on_prev_tokens``; None:
        the generation config's, False in transformers).
    temperature:
        the temperatures tried in turn for a window whose output fails a threshold below (one value: no fallback);
        above 0 the tokens are sampled, from ``seed``.
    compression_ratio_threshold, logprob_threshold, no_speech_threshold:
        when a window falls back to the next temperature (its tokens compress better than the ratio: repetition, or
        their average log-probability is lower), and when it is skipped as silence (no-speech probability above the
        threshold while the log-probability is low). transformers computes the compression ratio over token bytes,
        not text as OpenAI's Whisper does: its documented threshold is 1.35 (OpenAI's: 2.4).
    seed:
        torch's random seed for the sampling of every batch (the same in one process, on Ray and after a restart).
    """

    timestamps: bool = False
    word_timestamps: bool = False
    num_beams: int = 1
    max_new_tokens: int | None = None
    language: str | None = None
    task: str | None = None
    prompt: str | None = None
    condition_on_previous_text: bool | None = None
    temperature: tuple[float, ...] = (0.0,)
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    seed: int = 0

    def for_format(self, fmt: str) -> WhisperOptions:
        """These options with segment timestamps when ``fmt`` (txt, srt, vtt, json) writes them."""
        return replace(self, timestamps=self.timestamps or fmt in TIMED_FORMATS)

    @property
    def samples(self) -> bool:
        """Whether any temperature samples (and the seed matters)."""
        return any(value > 0 for value in self.temperature)


def is_long(samples: np.ndarray) -> bool:
    """More than one 30 s Whisper window (sequential long-form transcription)."""
    return len(samples) > WINDOW_SECONDS * SAMPLING_RATE


def language_code(language: str) -> str:
    """Whisper's code for ``language``: a code (``"fr"``), a name (``"French"``) or a token (``"<|fr|>"``).

    Raises ValueError naming the codes for an unknown one.
    """
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = language.strip().lower().removeprefix("<|").removesuffix("|>")
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ValueError(f"unknown language {language!r}: give a code such as en, fr, de, zh, or a name such as french")


def check_options(generation_config, options: WhisperOptions) -> None:
    """Refuse options this Whisper cannot honour, with a line saying why, before any audio is decoded.

    ``generation_config``: the model's (``GenerationConfig.from_pretrained(folder)`` needs no weights). An
    English-only model (``is_multilingual`` false, e.g. tiny.en) has no language or task tokens: ``"en"`` and
    ``"transcribe"`` are what it does anyway, anything else is refused (transformers would raise mid-batch).
    """
    multilingual = bool(getattr(generation_config, "is_multilingual", False))
    english_only = "this Whisper is English-only (a .en model)"
    if options.language is not None:
        code = language_code(options.language)
        if not multilingual and code != "en":
            raise ValueError(f"language {options.language!r}: {english_only}; use a multilingual Whisper")
        if multilingual and f"<|{code}|>" not in (getattr(generation_config, "lang_to_id", None) or {}):
            raise ValueError(f"language {options.language!r}: this model has no <|{code}|> token")
    if options.task not in (None, "transcribe", "translate"):
        raise ValueError(f"task {options.task!r}: use transcribe or translate")
    if options.task == "translate" and not multilingual:
        raise ValueError(f"task 'translate': {english_only} and cannot translate; use a multilingual Whisper")
    if options.word_timestamps and not getattr(generation_config, "alignment_heads", None):
        raise ValueError(
            "word timestamps need the cross-attention heads that align text with audio (alignment_heads in the "
            "model's generation_config.json), which this model does not list"
        )
    if not options.temperature or any(value < 0 for value in options.temperature):
        raise ValueError(f"temperature must be one or more values >= 0, got {options.temperature}")
    if options.no_speech_threshold is not None and options.logprob_threshold is None:
        raise ValueError(
            "a no-speech threshold needs a log-probability threshold (a window is skipped as silence only when its "
            "tokens are also unlikely)"
        )


def transcribe_batch(
    model,
    processor,
    clips: Sequence[np.ndarray],
    options: WhisperOptions | None = None,
    *,
    encoder_batch: int | None = None,
    progress: Callable[[float], None] | None = None,
    **option_fields,
) -> list[Transcription]:
    """Transcribe mono 16 kHz ``clips`` (each ``(samples,)`` float32) in as few generate() calls as their lengths
    allow (one for the clips up to 30 s, one for the longer ones); results in the order of ``clips``.

    Parameters
    ----------
    model, processor:
        a Whisper model (slim or not) and its processor.
    options:
        how to decode (:class:`WhisperOptions`); fields can also be given by name
        (``transcribe_batch(model, processor, clips, timestamps=True, num_beams=5)``).
    encoder_batch:
        inputs per encoder call (:func:`hf_slim.app.budget.encoder_micro_batches`); None: the whole batch at once.
    progress:
        called with audio seconds as they are transcribed: per 30 s window of the long clips, and once the short
        clips are done (for a progress bar).
    """
    options = replace(options or WhisperOptions(), **option_fields)
    if not clips:
        return []
    check_options(model.generation_config, options)
    results: list[Transcription | None] = [None] * len(clips)
    short = [i for i, clip in enumerate(clips) if not is_long(clip)]
    long = [i for i, clip in enumerate(clips) if is_long(clip)]
    context = encoder_micro_batches(model, encoder_batch) if encoder_batch else contextlib.nullcontext()
    with torch.inference_mode(), context, _seeded(model, options), _attention_kept(model):
        for rows, long_form in ((short, False), (long, True)):
            if not rows:
                continue
            batch = _transcribe(model, processor, [clips[i] for i in rows], options, long_form, progress)
            for i, result in zip(rows, batch, strict=True):
                results[i] = result
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _seeded(model, options: WhisperOptions) -> Iterator[None]:
    """torch's generator seeded with ``options.seed`` for a batch that may sample, and restored afterwards (the
    caller's random state is left as it was)."""
    if not options.samples:
        yield
        return
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed)
        yield


@contextlib.contextmanager
def _attention_kept(model) -> Iterator[None]:
    """Keep the model's attention implementation: transformers' Whisper generate switches the config to eager for
    good when token timestamps are asked for (the cross-attention weights), which would leave every later batch on
    the slower eager encoder."""
    config = model.config
    implementation = config._attn_implementation
    try:
        yield
    finally:
        if config._attn_implementation != implementation:
            config._attn_implementation = implementation


def _features(
    processor, clips: Sequence[np.ndarray], long_form: bool, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_features: (batch, mels, frames), attention_mask: (batch, frames) or None)``, each clip's features
    computed on its own: 30 s windows (zero-padded audio) for short clips; for long ones the whole clip, padded here
    to the longest with a mask saying where each ends (generate never reads past it). Short clips get a mask only
    when ``with_mask`` (word timestamps: the alignment then ignores the padding)."""
    extractor = processor.feature_extractor
    whole = dict(truncation=False, padding="longest") if long_form else {}  # short: one zero-padded 30 s window
    features = [
        extractor(clip, sampling_rate=SAMPLING_RATE, return_tensors="pt", **whole).input_features[0] for clip in clips
    ]
    if not long_form and not with_mask:
        return torch.stack(features), None
    frames = max(feature.shape[-1] for feature in features)
    padded = features[0].new_zeros(len(features), features[0].shape[0], frames)  # where the features are
    mask = torch.zeros(len(features), frames, dtype=torch.long, device=padded.device)
    for row, (clip, feature) in enumerate(zip(clips, features, strict=True)):
        padded[row, :, : feature.shape[-1]] = feature
        # the frames holding audio: a long clip's features end with it; a short one's window is padded after it
        mask[row, : feature.shape[-1] if long_form else min(frames, -(-len(clip) // extractor.hop_length))] = 1
    return padded, mask


def _generate_kwargs(model, processor, options: WhisperOptions) -> dict:
    """``options`` as ``WhisperForConditionalGeneration.generate`` arguments; the defaults are left out, so a run
    without options calls generate exactly as before they existed."""
    kwargs: dict = {"num_beams": options.num_beams}
    if options.max_new_tokens:
        kwargs["max_new_tokens"] = options.max_new_tokens
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    if options.language is not None and multilingual:  # an English-only model transcribes English anyway
        kwargs["language"] = language_code(options.language)
    if options.task is not None and multilingual:
        kwargs["task"] = options.task
    if options.prompt:
        device = next(model.parameters()).device
        kwargs["prompt_ids"] = processor.get_prompt_ids(options.prompt, return_tensors="pt").to(device)
    if options.condition_on_previous_text is not None:
        kwargs["condition_on_prev_tokens"] = options.condition_on_previous_text
    if options.temperature != (0.0,):
        kwargs["temperature"] = options.temperature if len(options.temperature) > 1 else options.temperature[0]
    thresholds = {
        "compression_ratio_threshold": options.compression_ratio_threshold,
        "logprob_threshold": options.logprob_threshold,
        "no_speech_threshold": options.no_speech_threshold,
    }
    kwargs |= {name: value for name, value in thresholds.items() if value is not None}
    return kwargs


def _window_progress(processor, progress: Callable[[float], None]) -> Callable[[torch.Tensor], None]:
    """A ``monitor_progress`` for long-form generate: ``progress(seconds)`` with the audio seconds the windows
    finished since the last call (generate calls it before each window with ``(batch, 2)``: frames done, frames)."""
    extractor = processor.feature_extractor
    seconds_per_frame = extractor.hop_length / extractor.sampling_rate
    reported = 0

    def monitor(seek_and_total: torch.Tensor) -> None:
        nonlocal reported
        done = int(seek_and_total.min(dim=1).values.sum())
        if done > reported:
            progress((done - reported) * seconds_per_frame)
            reported = done

    return monitor


def _transcribe(model, processor, clips, options: WhisperOptions, long_form: bool, progress) -> list[Transcription]:
    parameter = next(model.parameters())
    features, mask = _features(processor, clips, long_form, with_mask=options.word_timestamps)
    features = features.to(device=parameter.device, dtype=parameter.dtype)
    tokenizer = processor.tokenizer
    durations = [len(clip) / SAMPLING_RATE for clip in clips]
    settings = _generate_kwargs(model, processor, options)
    if mask is not None:
        settings["attention_mask"] = mask.to(parameter.device)
    if long_form and progress is not None:
        settings["monitor_progress"] = _window_progress(processor, progress)
    if not (options.timestamps or options.word_timestamps or long_form):
        out = model.generate(features, return_dict_in_generate=True, **settings)
        results = []
        for row, duration in zip(out.sequences, durations, strict=True):  # (init tokens + new tokens,) each
            generated = _after_prompt(model, row)
            results.append(Transcription(
                text=tokenizer.decode(generated, skip_special_tokens=True).strip(), duration=duration,
                language=_language(model, generated), token_ids=_content_ids(model, generated),
            ))  # fmt: skip
    else:
        timings = {"return_token_timestamps": True} if options.word_timestamps else {}
        out = model.generate(features, return_timestamps=True, return_segments=True, **timings, **settings)
        results = [
            _timed_transcription(model, tokenizer, out["sequences"][row], segments, duration, options.word_timestamps)
            for row, (segments, duration) in enumerate(zip(out["segments"], durations, strict=True))
        ]
    if progress is not None:
        progress(sum(durations) if not long_form else 0.0)  # long clips were reported window by window
    return results


def _timed_transcription(model, tokenizer, sequence, segments: list[dict], duration: float, words: bool):
    """One clip's :class:`Transcription` from generate's segments (``{"start", "end", "tokens", "result", and with
    token timestamps "token_timestamps"}`` each)."""
    first = segments[0]["result"] if segments else None
    if isinstance(first, dict):  # with token timestamps, each segment keeps its window's whole output
        first = first.get("sequences")
    language = _language(model, _after_prompt(model, first) if isinstance(first, torch.Tensor) else None)
    parts = []
    for segment in segments:
        text = tokenizer.decode(segment["tokens"], skip_special_tokens=True).strip()
        if not text:
            continue
        parts.append(Segment(
            start=round(float(segment["start"]), 3), end=round(min(float(segment["end"]), duration), 3), text=text,
            words=_words(model, tokenizer, segment, duration, language) if words else [],
        ))  # fmt: skip
    return Transcription(
        text=tokenizer.decode(sequence, skip_special_tokens=True).strip(), duration=duration, language=language,
        segments=parts, token_ids=_content_ids(model, sequence),
    )  # fmt: skip


def _words(model, tokenizer, segment: dict, duration: float, language: str | None) -> list[Word]:
    """The words of one segment with their times: token k of the segment spans from the time of token k - 1 to its
    own (the transformers ASR pipeline's reading of ``token_timestamps``); tokens are grouped into words by
    transformers' own rule (spaces, or unicode boundaries for languages written without them)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, _combine_tokens_into_words

    tokens = segment["tokens"].tolist()
    times = [float(time) for time in segment["token_timestamps"]]  # seconds from the clip's start, one per token
    first_special = min(tokenizer.all_special_ids)
    text = [k for k, token in enumerate(tokens) if token < first_special]  # positions of the text tokens
    if not text:
        return []
    starts = [times[k - 1] if k > 0 else float(segment["start"]) for k in text]
    ends = [times[k] for k in text]
    names, _, indices = _combine_tokens_into_words(tokenizer, [tokens[k] for k in text], LANGUAGES.get(language or ""))
    return [
        Word(start=round(min(starts[group[0]], duration), 3), end=round(min(ends[group[-1]], duration), 3),
             word=name.strip())
        for name, group in zip(names, indices, strict=True)
        if name.strip()
    ]  # fmt: skip


def _after_prompt(model, sequence: torch.Tensor) -> torch.Tensor:
    """The part of a generated sequence from its start token on: a prompt (``<|startofprev|>`` and its text) comes
    before ``<|startoftranscript|>`` and is no part of the transcript."""
    start = model.generation_config.decoder_start_token_id
    positions = (sequence == start).nonzero()
    return sequence[int(positions[-1]) :] if len(positions) else sequence


def _content_ids(model, sequence: torch.Tensor) -> list[int]:
    """The generated ids without the start tokens and padding (timestamp tokens are content: they place segments)."""
    config = model.generation_config
    special = {config.decoder_start_token_id, config.pad_token_id, config.eos_token_id, config.no_timestamps_token_id}
    special |= set((getattr(config, "lang_to_id", None) or {}).values())
    special |= set((getattr(config, "task_to_id", None) or {}).values())
    return [token for token in sequence.tolist() if token not in special]


def _language(model, sequence: torch.Tensor | None) -> str | None:
    """The language token the model generated (multilingual models), ``"en"`` for an English-only model.
    ``sequence``: from the start token on (:func:`_after_prompt`)."""
    config = model.generation_config
    lang_to_id = getattr(config, "lang_to_id", None) or {}
    if not getattr(config, "is_multilingual", bool(lang_to_id)):
        return "en"
    if sequence is None:
        return None
    by_id = {token_id: token.strip("<|>") for token, token_id in lang_to_id.items()}
    return next((by_id[token] for token in sequence.tolist()[:4] if token in by_id), None)
