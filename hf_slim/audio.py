"""Minimal WAV loading for speech models, with no audio library dependency.

Why: Whisper wants mono float32 samples at 16 kHz. The standard library ``wave`` module reads PCM WAV files; this
module converts them to float, mixes them down and resamples them with a windowed-sinc filter.
"""

from __future__ import annotations

import math
import os
import wave

import numpy as np
import torch

WHISPER_SAMPLING_RATE = 16_000
#: data chunk size that streaming writers (e.g. ffmpeg to a pipe) put in the header when the length is not known
_UNKNOWN_LENGTH = 0xFFFFFFFF
_CONVERT = "hf_slim reads integer PCM WAV: convert it, e.g. ffmpeg -i IN -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav"


def load_wav(path: str | os.PathLike, sampling_rate: int | None = WHISPER_SAMPLING_RATE) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file as mono float32 samples in ``[-1, 1]``.

    Why: gives speech pipelines their expected input (e.g. ``WhisperFeatureExtractor`` at 16 kHz) from a file on
    disk without ffmpeg, soundfile or torchaudio.

    Parameters
    ----------
    path : str or os.PathLike
        WAV file with 8-bit unsigned, or 16/24/32-bit signed integer PCM samples, any channel count.
    sampling_rate : int or None, default 16000
        Rate to resample to; ``None`` keeps the file's rate.

    Returns
    -------
    tuple[numpy.ndarray, int]
        Samples of shape ``(num_samples,)`` (channels averaged), dtype float32, and their sampling rate.

    Raises
    ------
    ValueError
        If the file is not a PCM WAV file, has an unsupported sample width, or holds fewer samples than its header
        announces (empty, or cut off by an interrupted copy or download).
    """
    try:
        with wave.open(os.fspath(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            announced = wav.getnframes()  # from the header's data chunk size
            frames = wav.readframes(announced)
    except EOFError as err:
        raise ValueError(
            f"{path}: the WAV file is truncated (it ends inside its header); copy or export it again"
        ) from err
    except wave.Error as err:
        raise ValueError(f"{path}: not a readable PCM WAV file ({err}); {_CONVERT}") from err
    frames = _whole_frames(path, frames, announced, width * channels, rate)
    if width == 1:
        samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        samples = np.frombuffer(frames, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:  # 24-bit: place the 3 bytes in the top of an int32
        padded = np.zeros((len(frames) // 3, 4), np.uint8)
        padded[:, 1:] = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        samples = padded.view("<i4")[:, 0].astype(np.float32) / 2.0**31
    else:
        raise ValueError(f"{path}: unsupported WAV sample width of {width} bytes (supported: 1, 2, 3, 4)")
    samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    if sampling_rate is not None and sampling_rate != rate:
        samples, rate = resample(samples, rate, sampling_rate), sampling_rate
    return samples, rate


def _whole_frames(path, frames: bytes, announced: int, frame_bytes: int, rate: int) -> bytes:
    """The complete frames of ``frames``, or a ValueError if the file is empty or shorter than its header says.

    Why: an empty WAV would reach Whisper as silence (transcribed as "you"), and a cut-off one as a shorter clip;
    both would be wrong answers with exit status 0.
    """
    present = len(frames) // frame_bytes
    if rate <= 0:
        raise ValueError(f"{path}: the WAV header gives a sampling rate of {rate} Hz; {_CONVERT}")
    if present == 0:
        raise ValueError(
            f"{path}: the WAV file holds no audio samples (empty, or truncated after its header); record or export "
            "it again"
        )
    if present < announced and announced != _UNKNOWN_LENGTH // frame_bytes:
        raise ValueError(
            f"{path}: the WAV file is truncated: its header announces {announced / rate:.2f} s ({announced} frames) "
            f"but only {present / rate:.2f} s are present; copy or export it again"
        )
    return frames[: present * frame_bytes]  # (present * channels * width) bytes: no partial frame


def resample(samples: np.ndarray, orig_rate: int, new_rate: int, zero_crossings: int = 16) -> np.ndarray:
    """Change the sampling rate of a 1-D signal with a Hann-windowed sinc low-pass filter.

    Why: band-limited resampling keeps speech intelligible and avoids the aliasing that plain linear interpolation
    adds when going down from 44.1/48 kHz to 16 kHz.

    The ratio is reduced to ``new / orig`` (coprime), so output sample ``m * new + p`` sits at input position
    ``m * orig + p * orig / new``: one filter per phase ``p``, applied as a strided convolution.

    Parameters
    ----------
    samples : numpy.ndarray
        Signal of shape ``(num_samples,)``.
    orig_rate, new_rate : int
        Sampling rates in Hz.
    zero_crossings : int, default 16
        Sinc zero crossings kept on each side; more is sharper and slower.

    Returns
    -------
    numpy.ndarray
        Float32 signal of shape ``(ceil(num_samples * new_rate / orig_rate),)``.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_rate} and {new_rate}")
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if orig == new:
        return x.numpy().copy()
    cutoff = 0.99 * min(1.0, new / orig)  # cycles per input sample, relative to the input Nyquist
    half_width = math.ceil(zero_crossings / cutoff)  # filter half-length in input samples
    # distance (in input samples) between each kernel tap and the output position of each phase
    taps = torch.arange(2 * half_width + orig, dtype=torch.float64) - half_width
    distance = taps[None, :] - torch.arange(new, dtype=torch.float64)[:, None] * orig / new
    window = torch.cos(distance.clamp(-half_width, half_width) * math.pi / (2 * half_width)) ** 2
    kernel = (cutoff * torch.sinc(cutoff * distance) * window).to(torch.float32)
    padded = torch.nn.functional.pad(x[None, None], (half_width, half_width + orig))
    out = torch.nn.functional.conv1d(padded, kernel[:, None, :], stride=orig)  # (1, new, positions)
    n_out = math.ceil(len(x) * new / orig)
    return out[0].T.reshape(-1)[:n_out].numpy().copy()
