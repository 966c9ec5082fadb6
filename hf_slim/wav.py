"""16-bit PCM WAV files to float32 samples with the standard library: what K-mode calibration reads the bundled speech
sample with, so the library needs none of the application's audio decoders (:mod:`hf_slim.app.audio`)."""

from __future__ import annotations

import os
import wave

import numpy as np


def read_wav(path: str | os.PathLike, sampling_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV file as mono float32 samples.

    Why: calibration of speech models (Whisper, speech encoder-decoders) runs on real speech, the sample shipped in
    ``hf_slim/data/sample.wav``; the library reads it with ``wave`` alone. The samples are those libsndfile gives
    (``int16 / 32768``, channels averaged in float32), bit for bit, so calibration sees what it saw when it read the
    file through :func:`hf_slim.app.audio.load_audio`.

    Parameters
    ----------
    path : str or os.PathLike
        A 16-bit PCM WAV file.
    sampling_rate : int or None
        The rate the caller needs; a file at another rate is refused (nothing is resampled here). None: any rate.

    Returns
    -------
    tuple[numpy.ndarray, int]
        Samples of shape ``(num_samples,)``, float32 in ``[-1, 1)``, and their sampling rate.

    Raises
    ------
    ValueError
        If the file is not 16-bit PCM WAV, holds no samples, or is at another rate than ``sampling_rate``.
    """
    try:
        with wave.open(os.fspath(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise ValueError(f"{path}: not a PCM WAV file ({error}); read other audio with hf_slim.app.audio") from error
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; this reader takes 16-bit PCM WAV")
    if sampling_rate is not None and rate != sampling_rate:
        raise ValueError(f"{path}: {rate} Hz, {sampling_rate} Hz needed (nothing is resampled here)")
    samples = np.frombuffer(data, dtype="<i2").reshape(-1, channels).astype(np.float32) / 32768  # (frames, channels)
    if samples.shape[0] == 0:
        raise ValueError(f"{path}: the file holds no audio samples")
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]  # (frames,)
    return np.ascontiguousarray(mono), rate
