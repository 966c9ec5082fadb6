"""Transcript files (txt, srt, vtt, json) and the bulk-job rules for writing them: atomic, resumable.

Why atomic: a bulk job may be killed at any moment (Ctrl-C, a pre-empted machine). Each output is written to a
temporary file in the same folder and renamed into place (``os.replace``: atomic on POSIX and Windows), so an output
file that exists is complete, and ``--resume`` can skip it on that evidence alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .transcription import Transcription

FORMATS = ("txt", "srt", "vtt", "json")
#: prefix of the temporary files :func:`write_atomic` creates (left behind only by a killed process)
TEMP_PREFIX = ".hf-slim-partial-"


def _clock(seconds: float, separator: str) -> str:
    """``3723.5 -> '01:02:03,500'`` (srt, ``separator=','``) or ``'01:02:03.500'`` (vtt)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(result: Transcription) -> list[tuple[float, float, str]]:
    """Subtitle cues: the segments, or one cue over the whole clip when the run kept no timestamps."""
    if result.segments:
        return [(segment.start, segment.end, segment.text) for segment in result.segments]
    return [(0.0, result.duration, result.text)] if result.text else []


def render(result: Transcription, fmt: str, source: str | None = None) -> str:
    """The text of ``result`` as a ``fmt`` file (one of :data:`FORMATS`)."""
    if fmt == "txt":
        return result.text + "\n"
    if fmt == "srt":
        blocks = [
            f"{number}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
            for number, (start, end, text) in enumerate(_cues(result), start=1)
        ]
        return "\n".join(blocks)
    if fmt == "vtt":
        blocks = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text}\n" for start, end, text in _cues(result)]
        return "WEBVTT\n\n" + "\n".join(blocks)
    if fmt == "json":
        document = {
            "source": source,
            "text": result.text,
            "language": result.language,
            "duration": round(result.duration, 3),
            "segments": [
                {"start": segment.start, "end": segment.end, "text": segment.text} for segment in result.segments
            ],
            "token_ids": "@TOKEN_IDS@",
        }
        text = json.dumps(document, ensure_ascii=False, indent=2)  # token ids on one line, not one per line:
        return text.replace('"@TOKEN_IDS@"', json.dumps(result.token_ids)) + "\n"
    raise ValueError(f"unknown output format {fmt!r} (use one of {', '.join(FORMATS)})")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` is either absent, as before, or complete: a temporary file in
    the same folder, flushed to disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def output_paths(inputs: list[tuple[Path, Path]], output_dir: Path, fmt: str) -> list[Path]:
    """One output per input: ``output_dir`` / the input's path relative to where it was found (a folder given on
    the command line, or its own folder for a file given by name), with the suffix ``.fmt``.

    ``inputs`` holds ``(file, root)`` pairs. Two inputs that would write the same output (``a.wav`` and ``a.mp3``)
    are a ValueError naming both, before any work.
    """
    outputs: dict[Path, Path] = {}
    paths = []
    for file, root in inputs:
        target = output_dir / file.relative_to(root).with_suffix(f".{fmt}")
        if target in outputs:
            raise ValueError(
                f"{outputs[target]} and {file} would both write {target}: rename one, or transcribe them separately"
            )
        outputs[target] = file
        paths.append(target)
    return paths


def remove_partial_files(output_dir: Path) -> int:
    """Delete the temporary files a killed run left in ``output_dir`` (never a finished output); returns how many."""
    if not output_dir.is_dir():
        return 0
    partial = [path for path in output_dir.rglob(f"{TEMP_PREFIX}*") if path.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)
