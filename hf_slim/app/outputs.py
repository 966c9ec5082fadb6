"""Transcript files (txt, srt, vtt, json) and the bulk-job rules for writing them: atomic, resumable.

Why atomic: a bulk job may be killed at any moment (Ctrl-C, a pre-empted machine). Each output is written to a
temporary file in the same folder and renamed into place (``os.replace``: atomic on POSIX and Windows), so an output
file that exists is complete, and ``--resume`` can skip it on that evidence alone.

Why not ``tempfile.mkstemp``: it creates files readable by their owner only (0600), and the rename keeps that mode,
so subtitles a web server or a colleague should read were private. The temporary file is created with mode 0666
instead, which the kernel reduces by the umask, as for any file the user writes.
"""

from __future__ import annotations

import json
import os
import secrets
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
    """Subtitle cues: one per word when the run timed words (``--word-timestamps``), else the segments, or one cue
    over the whole clip when the run kept no timestamps."""
    if any(segment.words for segment in result.segments):
        return [(word.start, word.end, word.word) for segment in result.segments for word in segment.words]
    if result.segments:
        return [(segment.start, segment.end, segment.text) for segment in result.segments]
    return [(0.0, result.duration, result.text)] if result.text else []


def _segment_document(segment, one_line: list) -> dict:
    """A segment in json: ``{"start", "end", "text"}``, and its ``"words"`` (``{"start", "end", "word"}`` each, one
    line per word: placeholders for the values in ``one_line``) when the run timed words."""
    document = {"start": segment.start, "end": segment.end, "text": segment.text}
    if segment.words:
        document["words"] = [_one_line_value({"start": w.start, "end": w.end, "word": w.word}, one_line)
                             for w in segment.words]  # fmt: skip
    return document


def _one_line_value(value, one_line: list) -> str:
    """A placeholder :func:`render` replaces by ``value`` written on one line (``indent=2`` would give every number
    of a token id list or a word its own line)."""
    one_line.append(value)
    return f"@ONE_LINE_{len(one_line) - 1}@"


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
        one_line: list = []
        document = {
            "source": source,
            "text": result.text,
            "language": result.language,
            "duration": round(result.duration, 3),
            "segments": [_segment_document(segment, one_line) for segment in result.segments],
            "token_ids": _one_line_value(result.token_ids, one_line),
        }
        text = json.dumps(document, ensure_ascii=False, indent=2)
        for index, value in enumerate(one_line):
            text = text.replace(f'"@ONE_LINE_{index}@"', json.dumps(value, ensure_ascii=False), 1)
        return text + "\n"
    raise ValueError(f"unknown output format {fmt!r} (use one of {', '.join(FORMATS)})")


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """``(descriptor, path)`` of a new, empty temporary file in ``path``'s folder, opened for writing, with the
    permissions the umask gives new files (``mkstemp`` would make it 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}{path.suffix}"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:  # 2**-64 per try: another writer's name
            continue


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` is either absent, as before, or complete: a temporary file in
    the same folder, flushed to disk, then renamed over ``path``. The file gets the permissions of any file the
    user creates (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _temporary_beside(path)
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
