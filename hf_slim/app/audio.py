"""Audio files to the mono 16 kHz float32 samples speech models take, through well-kept libraries.

Why these libraries: ``soundfile`` (libsndfile, bundled in its wheels for Linux, macOS and Windows: no system binary)
decodes WAV of every sample type, FLAC, MP3 and OGG (Vorbis, Opus); it is what ``datasets[audio]`` and ``librosa``
read audio with, so most transformers speech users have it already. ``soxr`` (the SoX resampler, also bundled in its
wheels, and librosa's default) resamples to 16 kHz. M4A/AAC, MP4, WebM and the other containers libsndfile does not
read are decoded with PyAV (FFmpeg's libraries, bundled in its wheels; a dependency of hf_slim).

Bad files are one ``ValueError`` that names the file and says what is wrong: an empty file, a file with no samples, a
WAV file shorter than its header says (an interrupted copy or download), or a file neither library can decode.

Native decoders print on the process's stderr (libmpg123, inside libsndfile: "Note: Illegal Audio-MPEG-Header ...,
Trying to resync..." for a damaged MP3), beside the one line a bulk job prints per bad file. Inside
:func:`quiet_native_decoders` (the command line runs in it) file descriptor 2 points at the null device while a native
decoder runs, and Python's own ``sys.stderr`` writes go to a copy of the original descriptor, so no message of ours
is lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

WHISPER_SAMPLING_RATE = 16_000
#: what every message about an undecodable file suggests
_CONVERT = "convert it, e.g. ffmpeg -i IN -ar 16000 OUT.flac"
#: what a file without samples is told (an empty file, or a header without data)
_NO_SAMPLES = "the file holds no audio samples (empty, or truncated after its header); record or export it again"
#: data size that streaming writers (ffmpeg to a pipe) put in a WAV header when the length is not known
_UNKNOWN_LENGTH = 0xFFFFFFFF
#: libsndfile's header log for a WAV-family file whose data chunk is shorter than announced: "data : 64000 (should be
#: 16001)" (bytes announced, bytes present)
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError) as error:  # OSError: the wheel's libsndfile could not be loaded
        raise ImportError(
            f"reading audio needs the soundfile package (libsndfile): pip install soundfile ({error})"
        ) from error
    return soundfile


def _pyav():
    """PyAV, or None when it cannot be imported (a dependency of hf_slim, so only on a broken or hand-trimmed
    install: then M4A/AAC and the other FFmpeg-only formats are refused with a line saying what to install)."""
    try:
        import av
    except ImportError:
        return None
    return av


def supported_formats() -> str:
    """The formats :func:`load_audio` reads here, for messages: libsndfile's, plus FFmpeg's when PyAV is installed."""
    base = "WAV (any sample type), FLAC, MP3, OGG (Vorbis, Opus)"
    return base + (", and what FFmpeg reads (M4A/AAC, MP4, WebM, ...)" if _pyav() is not None else "")


class _NativeStderr:
    """Process-wide state of :func:`quiet_native_decoders`: how many blocks asked for quiet, how many native calls
    are running (threads decode concurrently: fd 2 is restored when the last one ends), and the saved fd 2."""

    lock = threading.Lock()
    quiet = 0
    running = 0
    saved: int | None = None


@contextlib.contextmanager
def quiet_native_decoders() -> Iterator[None]:
    """Drop what native decoders print on stderr while the block runs; Python's messages still reach stderr.

    Why: a damaged MP3 makes libmpg123 (inside libsndfile) print "Note: Illegal Audio-MPEG-Header ..." lines on file
    descriptor 2, beside the one line a bulk job prints per bad file. C libraries write to fd 2 directly, so the
    only way to drop them is to point fd 2 elsewhere while they run; decoding runs in a background thread while the
    main thread draws the progress bar and reports failures, so ``sys.stderr`` is first moved to a duplicate of fd 2
    (when it writes to fd 2 at all), which the redirection does not touch. Native writes of other threads during a
    decode (rare: torch reports through Python warnings) are dropped too.
    """
    try:
        os.fstat(2)
    except OSError:  # no fd 2 (a daemon that closed it): nothing prints, nothing to drop
        yield
        return
    original = sys.stderr
    try:
        writes_to_fd2 = original is not None and original.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured or replaced stream (pytest's capsys, a notebook)
        writes_to_fd2 = False
    python_stream = None
    if writes_to_fd2:
        original.flush()
        python_stream = open(  # closed below, after sys.stderr is restored
            os.dup(2), "w", buffering=1, encoding=original.encoding, errors=original.errors, closefd=True
        )
        sys.stderr = python_stream
    with _NativeStderr.lock:
        _NativeStderr.quiet += 1
    try:
        yield
    finally:
        with _NativeStderr.lock:
            _NativeStderr.quiet -= 1
        if python_stream is not None:
            python_stream.flush()
            sys.stderr = original
            python_stream.close()


@contextlib.contextmanager
def _native_call() -> Iterator[None]:
    """Around a call into libsndfile or FFmpeg: fd 2 on the null device when :func:`quiet_native_decoders` is on."""
    with _NativeStderr.lock:
        if not _NativeStderr.quiet:
            quiet = False
        else:
            quiet = True
            if _NativeStderr.running == 0:
                _NativeStderr.saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            _NativeStderr.running += 1
    try:
        yield
    finally:
        if quiet:
            with _NativeStderr.lock:
                _NativeStderr.running -= 1
                if _NativeStderr.running == 0:
                    os.dup2(_NativeStderr.saved, 2)
                    os.close(_NativeStderr.saved)
                    _NativeStderr.saved = None


def load_audio(path: str | os.PathLike, sampling_rate: int | None = WHISPER_SAMPLING_RATE) -> tuple[np.ndarray, int]:
    """Decode an audio file to mono float32 samples, resampled to ``sampling_rate``.

    Why: speech models take one channel at a fixed rate (Whisper's feature extractor: 16 kHz); users bring WAV, FLAC,
    MP3, OGG or M4A at 8-48 kHz, mono or stereo.

    Parameters
    ----------
    path : str or os.PathLike
        Any format libsndfile reads (WAV of any sample type, FLAC, MP3, OGG Vorbis/Opus, AIFF, ...), or, through
        PyAV, any format FFmpeg reads (M4A/AAC, MP4, WebM, ...).
    sampling_rate : int or None, default 16000
        Rate to resample to (with soxr, high quality); ``None`` keeps the file's rate.

    Returns
    -------
    tuple[numpy.ndarray, int]
        Samples of shape ``(num_samples,)`` (channels averaged), dtype float32, in ``[-1, 1]`` for integer formats,
        and their sampling rate.

    Raises
    ------
    ValueError
        If the file is empty or holds no samples, is a WAV file shorter than its header announces (cut off by an
        interrupted copy or download), or cannot be decoded; the message names the file.
    """
    path = _audio_file(path)
    with _native_call():
        samples, rate = _decode(path)  # (frames, channels) float32
    if samples.shape[0] == 0:
        raise ValueError(f"{path}: {_NO_SAMPLES}")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if sampling_rate is not None and sampling_rate != rate:
        mono, rate = resample(mono, rate, sampling_rate), sampling_rate
    return np.ascontiguousarray(mono, dtype=np.float32), rate


#: the name this module's reader had when it read WAV files only; every caller keeps working and gets every format
load_wav = load_audio


def probe_audio(path: str | os.PathLike) -> float:
    """Duration in seconds of an audio file, from its header, with the checks :func:`load_audio` makes up front.

    Why: a bulk job checks every input before it loads a model, so a file that is not audio, holds no samples or is
    a cut-off WAV is reported at once (one line naming it) instead of after minutes of work.

    Raises
    ------
    ValueError
        As :func:`load_audio`, for what the header shows (decoding errors further in show only when decoding).
    """
    path = _audio_file(path)
    soundfile = _soundfile()
    with _native_call():
        try:
            info = soundfile.info(str(path))
        except soundfile.LibsndfileError as error:
            av = _require_pyav(path, _libsndfile_message(error))
            with _opened_with_pyav(av, path, _libsndfile_message(error)) as (_, stream):
                seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
            return seconds
    _check_header(path, info)
    return float(info.frames) / info.samplerate


def _audio_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, refused when it is missing or empty (0 bytes: libsndfile and FFmpeg would only say the
    format is not recognised)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), it holds no audio samples; record or export it again")
    return path


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """``(samples: (frames, channels) float32, rate)`` from libsndfile, else from PyAV; ValueError naming the file."""
    soundfile = _soundfile()
    try:
        info = soundfile.info(str(path))
    except soundfile.LibsndfileError as error:
        libsndfile_error = _libsndfile_message(error)
        return _decode_with_pyav(_require_pyav(path, libsndfile_error), path, libsndfile_error)
    _check_header(path, info)
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as error:  # e.g. FLAC "decoder lost sync": the file is cut off or damaged
        raise ValueError(f"{path}: cannot decode this audio file ({_libsndfile_message(error)}); {_CONVERT}") from None
    _check_complete(path, info, samples.shape[0])
    return samples, rate


def _require_pyav(path: Path, libsndfile_error: str):
    """PyAV for a file libsndfile cannot open, or the ValueError that says what reads it."""
    av = _pyav()
    if av is None:
        hint = "for M4A/AAC, MP4 or WebM install PyAV (FFmpeg's libraries): pip install av"
        raise ValueError(
            f"{path}: cannot decode this audio file ({libsndfile_error}); readable here: {supported_formats()}; "
            f"{hint}, or {_CONVERT}"
        )
    return av


def _check_header(path: Path, info) -> None:
    """What libsndfile's header read shows: a bad rate, no samples, a WAV data chunk shorter than announced."""
    if info.samplerate <= 0:
        raise ValueError(f"{path}: the header gives a sampling rate of {info.samplerate} Hz; {_CONVERT}")
    if info.frames == 0:
        raise ValueError(f"{path}: {_NO_SAMPLES}")
    _check_complete(path, info, None)


def _libsndfile_message(error) -> str:
    """libsndfile's reason without soundfile's "Error opening 'PATH': " prefix (the message names the file once)."""
    text = str(getattr(error, "error_string", "") or error).strip()
    text = re.sub(r"^Error opening .*?: ", "", text).rstrip(".")
    if "does not exist or is not a regular file" in text:  # what libsndfile says of data it cannot parse at all
        return "unrecognised or damaged data"
    return text


def _check_complete(path: Path, info, frames: int | None) -> None:
    """Refuse a file cut off by an interrupted copy or download, where the format says so.

    Why: a cut-off copy would otherwise be transcribed as a shorter clip, with exit status 0. WAV family: libsndfile
    reads the frames present and logs the shortfall ("data : ANNOUNCED (should be PRESENT)", in bytes; a streamed
    file's unknown-length marker 0xFFFFFFFF is not one). MP3: fewer frames decode than the Xing/LAME header counts
    (1% slack: without that header libsndfile's count is an estimate). OGG: the last page lacks the end-of-stream
    flag. FLAC: the decoder itself fails ("lost sync").
    """
    log, rate = info.extra_info or "", info.samplerate
    if "lacks an end-of-stream bit" in log:  # OGG: the last page of a complete stream carries the end-of-stream flag
        raise ValueError(
            f"{path}: the OGG file is truncated (its last page is not the end of the stream); copy or export it again"
        )
    short_mp3 = frames is not None and frames < 0.99 * info.frames - 0.05 * rate  # against the Xing/LAME count
    if info.format == "MP3" and short_mp3:
        raise ValueError(
            f"{path}: the MP3 file is truncated or damaged: its header announces {info.frames / rate:.2f} s but only "
            f"{frames / rate:.2f} s decode; copy or export it again"
        )
    match = _SHORT_DATA.search(log)
    if match is None:
        return
    announced_bytes, present_bytes = int(match[1]), int(match[2])
    if announced_bytes == _UNKNOWN_LENGTH or present_bytes >= announced_bytes:
        return
    present = info.frames  # libsndfile counts the frames present
    bytes_per_frame = max(present_bytes // max(present, 1), 1)
    announced = announced_bytes // bytes_per_frame
    raise ValueError(
        f"{path}: the WAV file is truncated: its header announces {announced / rate:.2f} s ({announced} frames) but "
        f"only {present / rate:.2f} s are present; copy or export it again"
    )


@contextlib.contextmanager
def _opened_with_pyav(av, path: Path, libsndfile_error: str) -> Iterator[tuple]:
    """``(container, first audio stream)``; FFmpeg's errors become the one-line ValueError naming the file."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path}: the file has no audio stream; {_CONVERT}")
            stream = container.streams.audio[0]
            try:
                rate = stream.rate
            except AttributeError:  # a stream FFmpeg found but has no decoder for (no codec context)
                rate = None
            if not rate or rate <= 0:
                raise ValueError(f"{path}: cannot decode this audio file (libsndfile: {libsndfile_error}; FFmpeg: "
                                 f"no decoder for its audio stream); {_CONVERT}")  # fmt: skip
            yield container, stream
    except av.FFmpegError as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(
            f"{path}: cannot decode this audio file (libsndfile: {libsndfile_error}; FFmpeg: {reason}); {_CONVERT}"
        ) from None


def _decode_with_pyav(av, path: Path, libsndfile_error: str) -> tuple[np.ndarray, int]:
    """Every frame of the first audio stream as float32 ``(frames, channels)`` at the stream's rate (no resampling
    here: :func:`resample` does it for every format alike)."""
    chunks = []
    with _opened_with_pyav(av, path, libsndfile_error) as (container, stream):
        rate = int(stream.rate)
        # packed float32 keeps the stream's channels: to_ndarray() gives (1, samples * channels), interleaved
        converter = av.AudioResampler(format="flt", layout=stream.layout.name, rate=rate)
        for frame in [*container.decode(stream), None]:  # None flushes the converter
            for converted in converter.resample(frame):
                chunks.append(converted.to_ndarray().reshape(-1, len(converted.layout.channels)))
    channels = chunks[0].shape[1] if chunks else 1
    samples = np.concatenate(chunks) if chunks else np.zeros((0, channels), np.float32)
    return samples.astype(np.float32, copy=False), rate


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Change the sampling rate of a 1-D signal with soxr (the SoX resampler, high quality).

    Why: band-limited resampling keeps speech intelligible and avoids the aliasing that plain interpolation adds
    when going down from 44.1/48 kHz to 16 kHz.

    Parameters
    ----------
    samples : numpy.ndarray
        Signal of shape ``(num_samples,)``.
    orig_rate, new_rate : int
        Sampling rates in Hz.

    Returns
    -------
    numpy.ndarray
        Float32 signal of shape ``(round(num_samples * new_rate / orig_rate),)``.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_rate} and {new_rate}")
    x = np.ascontiguousarray(samples, dtype=np.float32)
    if orig_rate == new_rate:
        return x.copy()
    try:
        import soxr
    except ImportError as error:
        raise ImportError(f"resampling audio needs the soxr package: pip install soxr ({error})") from error
    return soxr.resample(x, orig_rate, new_rate, quality="HQ").astype(np.float32, copy=False)
