"""Inputs a new user gets wrong, at the library level: audio files that are empty, cut off or not audio
(hf_slim.app.audio.load_wav) and cache shapes that are zero, negative or meaningless (hf_slim.memory.cache_report).
Each must be a ValueError that says what is wrong, never a silent answer. The CLI side is in test_cli.py."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from test_export import tiny_t5
from tiny_models import tiny_gpt2

from hf_slim.app.audio import load_wav
from hf_slim.memory import cache_report

RATE = 16_000


def write_wav(path: Path, samples: np.ndarray, channels: int = 1) -> Path:
    """16-bit PCM WAV of ``samples: (n * channels,)`` in [-1, 1]."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def tone(seconds: float) -> np.ndarray:
    return np.sin(np.arange(int(seconds * RATE)) * 2 * np.pi * 440 / RATE).astype(np.float32) * 0.5


def wav_header(data_bytes: int, format_tag: int = 1, width: int = 2, rate: int = RATE) -> bytes:
    """A 44-byte RIFF/WAVE header (mono) announcing ``data_bytes`` of sample data."""
    fmt = struct.pack("<IHHIIHH", 16, format_tag, 1, rate, rate * width, width, 8 * width)  # size, then the fields
    riff_size = min(36 + data_bytes, 0xFFFFFFFF)
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data_bytes)


def empty(path: Path) -> Path:
    return write_wav(path, np.zeros(0, np.float32))


def header_only(path: Path) -> Path:
    """The header of a 1 s file with none of its samples (a download cut off after 44 bytes)."""
    full = write_wav(path, tone(1.0)).read_bytes()
    path.write_bytes(full[:44])
    return path


def truncated(path: Path) -> Path:
    """The first 0.25 s (and half a sample) of a 1 s stereo file."""
    full = write_wav(path, np.repeat(tone(1.0), 2), channels=2).read_bytes()
    path.write_bytes(full[: 44 + 4 * RATE // 4 + 1])
    return path


def cut_in_header(path: Path) -> Path:
    path.write_bytes(write_wav(path, tone(1.0)).read_bytes()[:30])
    return path


def float_pcm(path: Path) -> Path:
    """32-bit IEEE float WAV (what Audacity exports by default): format tag 3, not integer PCM."""
    samples = tone(0.5)
    path.write_bytes(wav_header(4 * len(samples), format_tag=3, width=4) + samples.astype("<f4").tobytes())
    return path


def zero_rate(path: Path) -> Path:
    path.write_bytes(wav_header(2 * RATE, rate=0) + (tone(1.0) * 32767).astype("<i2").tobytes())
    return path


BAD_WAV = {
    # case: (writer, message)
    "empty": (empty, r"holds no audio samples \(empty, or truncated after its header\)"),
    "header only": (header_only, r"holds no audio samples \(empty, or truncated after its header\)"),
    "truncated": (truncated, r"is truncated: its header announces 1.00 s \(16000 frames\) but only 0.25 s are present"),
    "cut inside the header": (cut_in_header, r"cannot decode this audio file \(.*No 'data' chunk marker"),
    "zero sampling rate": (zero_rate, r"cannot decode this audio file \("),
    "not audio at all": (lambda path: path.write_text("not audio") and path, r"cannot decode this audio file \("),
}


@pytest.mark.parametrize("case", list(BAD_WAV))
def test_bad_wav_is_a_clear_error(case, tmp_path):
    write, message = BAD_WAV[case]
    path = write(tmp_path / "audio.wav")
    with pytest.raises(ValueError, match=message) as error:
        load_wav(path)
    assert str(error.value).startswith(str(path)), "the message names the file"


def test_complete_streamed_and_float_wav_files_load(tmp_path):
    """The checks refuse nothing valid: a complete file, a streamed one whose header has the unknown-length
    marker 0xFFFFFFFF (ffmpeg writing to a pipe) instead of the data size, and 32-bit float samples (Audacity's
    default export, once refused by the hand-written reader)."""
    samples = tone(0.5)
    loaded, rate = load_wav(write_wav(tmp_path / "complete.wav", samples))
    assert rate == RATE and len(loaded) == len(samples)
    assert np.abs(loaded - samples).max() < 1e-4
    streamed = tmp_path / "streamed.wav"
    pcm = (samples * 32767).astype("<i2").tobytes()
    streamed.write_bytes(wav_header(0xFFFFFFFF) + pcm)
    loaded, _ = load_wav(streamed)
    assert len(loaded) == len(samples) and np.abs(loaded - samples).max() < 1e-4
    loaded, rate = load_wav(float_pcm(tmp_path / "float.wav"))
    assert rate == RATE and np.abs(loaded - tone(0.5)).max() < 1e-6


# ------------------------------------------------------------------------------------------------ cache_report


BAD_SHAPES = {
    # case: (model builder, cache_report keywords, message)
    "negative length": (tiny_gpt2, dict(seq_len=-5), r"seq_len must be a positive integer, got -5"),
    "zero length": (tiny_gpt2, dict(seq_len=0), r"seq_len must be a positive integer, got 0"),
    "zero batch": (tiny_gpt2, dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
    "fractional length": (tiny_gpt2, dict(seq_len=2.5), r"seq_len must be a positive integer, got 2.5"),
    "negative encoder length": (tiny_t5, dict(encoder_len=-5), r"encoder_len must be a positive integer, got -5"),
    "encoder length without encoder": (tiny_gpt2, dict(encoder_len=30), r"encoder_len is for encoder-decoder models"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_cache_report_rejects_meaningless_shapes(case):
    build, keywords, message = BAD_SHAPES[case]
    arguments = dict(batch_size=2, seq_len=8, verbose=False) | keywords
    with pytest.raises(ValueError, match=message):
        cache_report(build(), **arguments)


def test_cache_report_accepts_the_smallest_shapes():
    report = cache_report(tiny_t5(), batch_size=1, seq_len=1, encoder_len=1, verbose=False)
    assert 0 < report.slim_bytes < report.vanilla_bytes and report.encoder_bytes > 0
