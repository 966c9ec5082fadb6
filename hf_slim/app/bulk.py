"""Bulk jobs: many audio files or many prompts through one slim model, in batches, resumable.

Why one module: ``hf-slim transcribe`` and ``hf-slim generate`` (and their Ray form, :mod:`hf_slim.app.raydata`) share
the same rules: find the inputs, skip the ones whose output is already complete, cut the rest into batches in input
order (the same batches in one process and on Ray, so both give the same outputs), and write each output so that a
killed run leaves only complete files behind.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .audio import load_audio, probe_audio
from .outputs import output_paths, remove_partial_files, render, write_atomic
from .transcription import Transcription, WhisperOptions, transcribe_batch

#: suffixes a folder is searched for (files named on the command line are read whatever their suffix)
AUDIO_SUFFIXES = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".webm", ".aiff", ".aif", ".wma",
)  # fmt: skip
_GLOB_CHARACTERS = "*?["


def find_audio(arguments: Sequence[str]) -> list[tuple[Path, Path]]:
    """``(file, root)`` for every audio file named by ``arguments`` (files, folders searched recursively for
    :data:`AUDIO_SUFFIXES`, glob patterns such as ``calls/**/*.mp3``), in order, each file once. ``root`` is what the
    file's output path is relative to: the folder given, the fixed part of a pattern, or a named file's own folder.

    Raises ValueError for a name that is neither a file nor a folder nor a pattern matching a file.
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()

    def add(file: Path, root: Path) -> None:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            found.append((file, root))

    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise ValueError(f"{path}: no audio files in this folder (looked for {', '.join(AUDIO_SUFFIXES)})")
            for file in files:
                add(file, path)
        elif path.is_file():
            add(path, path.parent)
        elif any(character in argument for character in _GLOB_CHARACTERS):
            matches = sorted(Path(match) for match in glob.glob(argument, recursive=True) if Path(match).is_file())
            if not matches:
                raise ValueError(f"{argument}: no file matches this pattern")
            fixed = (
                Path(*[part for part in _leading_fixed_parts(argument)]) if _leading_fixed_parts(argument) else Path()
            )
            for file in matches:
                add(file, fixed)
        elif path.exists():
            raise ValueError(f"{path} is not a regular file (a device, pipe or socket): give an audio file or folder")
        else:
            raise ValueError(f"audio file not found: {path}")
    return found


def _leading_fixed_parts(pattern: str) -> list[str]:
    parts = []
    for part in Path(pattern).parts:
        if any(character in part for character in _GLOB_CHARACTERS):
            break
        parts.append(part)
    return parts


def batches(items: Sequence, batch_size: int) -> list[list]:
    """``items`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]


@dataclass
class AudioTask:
    """One input of a transcription job, where its output goes (None: printed) and its duration in seconds (from
    its header, once :func:`check_audio` read it: what a progress bar counts)."""

    path: Path
    output: Path | None
    duration: float = 0.0


@dataclass
class JobReport:
    """What a bulk job did: outputs written (or printed), inputs skipped as already done, inputs that failed (each
    with its one-line reason), and every result by input path, in input order."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    results: dict[Path, Transcription] = field(default_factory=dict)


def plan_audio_job(
    arguments: Sequence[str], output_dir: Path | None, fmt: str, *, resume: bool = True
) -> tuple[list[AudioTask], int]:
    """The tasks still to do and how many were skipped because their output exists (complete, by
    :func:`hf_slim.app.outputs.write_atomic`); temporary files a killed run left in ``output_dir`` are removed."""
    found = find_audio(arguments)
    if output_dir is None:
        return [AudioTask(file, None) for file, _ in found], 0
    targets = output_paths(found, output_dir, fmt)
    remove_partial_files(output_dir)
    tasks = [AudioTask(file, target) for (file, _), target in zip(found, targets, strict=True)]
    pending = [task for task in tasks if not (resume and task.output.is_file())]
    return pending, len(tasks) - len(pending)


def check_audio(tasks: list[AudioTask], report: JobReport, on_failure: Callable[[Path, str], None]) -> list[AudioTask]:
    """The tasks whose file header reads (:func:`hf_slim.app.audio.probe_audio`), each with its duration; the others go
    to ``report.failed`` and ``on_failure``, one line each, before any model is loaded."""
    readable = []
    for task in tasks:
        try:
            duration = probe_audio(task.path)
        except ValueError as error:
            report.failed.append((task.path, str(error)))
            on_failure(task.path, str(error))
            continue
        readable.append(replace(task, duration=duration))
    return readable


def decode_batch(tasks: Sequence[AudioTask]) -> list[np.ndarray | str]:
    """Each task's samples (mono, 16 kHz), or the one-line reason it could not be decoded."""
    decoded: list[np.ndarray | str] = []
    for task in tasks:
        try:
            decoded.append(load_audio(task.path)[0])
        except ValueError as error:
            decoded.append(str(error))
    return decoded


def decoded_batches(batched: list[list[AudioTask]]) -> Iterator[tuple[list[AudioTask], list[np.ndarray | str]]]:
    """``(tasks, decoded)`` per batch; the next batch decodes in a thread while the model works on this one
    (libsndfile, soxr and torch release the GIL)."""
    if not batched:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(decode_batch, batched[0])
        for index, tasks in enumerate(batched):
            decoded = upcoming.result()
            if index + 1 < len(batched):
                upcoming = pool.submit(decode_batch, batched[index + 1])
            yield tasks, decoded


def finish_batch(
    tasks: Sequence[AudioTask],
    decoded: Sequence[np.ndarray | str],
    results: Iterable[Transcription],
    fmt: str,
    report: JobReport,
    on_failure: Callable[[Path, str], None],
) -> None:
    """Record a batch: failures (decoded as a reason) to ``report.failed``; results to ``report.results`` and, for
    tasks with an output path, to their file, atomically."""
    results = iter(results)
    for task, samples in zip(tasks, decoded, strict=True):
        if isinstance(samples, str):
            report.failed.append((task.path, samples))
            on_failure(task.path, samples)
            continue
        result = next(results)
        report.results[task.path] = result
        if task.output is not None:
            write_atomic(task.output, render(result, fmt, source=str(task.path)))
        report.done += 1


def transcribe_tasks(
    model,
    processor,
    tasks: list[AudioTask],
    *,
    batch_size: int,
    fmt: str = "txt",
    options: WhisperOptions | None = None,
    encoder_batch: int | None = None,
    report: JobReport | None = None,
    on_failure: Callable[[Path, str], None] = lambda path, reason: None,
    progress: Callable[[int, float], None] = lambda files, seconds: None,
    **option_fields,
) -> JobReport:
    """Transcribe ``tasks`` in batches of ``batch_size`` files, in input order, writing each output as its batch
    finishes. A file that cannot be decoded is reported (``on_failure``, one line) and its batch goes on without it.

    ``options`` (or its fields by name, as :func:`hf_slim.app.transcription.transcribe_batch` takes them) say how
    Whisper decodes; segment timestamps are added for the formats that write them. ``progress(files, seconds)`` is
    called with the audio seconds transcribed as 30 s windows of long files finish (``files`` 0), and with the
    batch's files after every batch: the seconds of all calls add up to the tasks' durations.
    """
    report = report or JobReport()
    options = replace(options or WhisperOptions(), **option_fields).for_format(fmt)
    for batch, decoded in decoded_batches(batches(tasks, batch_size)):
        seconds = _BatchSeconds(sum(task.duration for task in batch), progress)
        clips = [samples for samples in decoded if not isinstance(samples, str)]
        results = transcribe_batch(model, processor, clips, options, encoder_batch=encoder_batch, progress=seconds)
        finish_batch(batch, decoded, results, fmt, report, on_failure)
        seconds.finish(len(batch))
    return report


class _BatchSeconds:
    """The audio seconds of one batch, passed on to ``progress(files, seconds)`` as transcription reports them and
    never more than the batch's duration (from the headers; decoded lengths differ by a few samples)."""

    def __init__(self, total: float, progress: Callable[[int, float], None]) -> None:
        self.total, self.progress, self.reported = total, progress, 0.0

    def __call__(self, seconds: float) -> None:
        step = min(seconds, self.total - self.reported)
        if step > 0:
            self.reported += step
            self.progress(0, step)

    def finish(self, files: int) -> None:
        """The batch is written: its files, and the seconds not reported yet."""
        self.progress(files, max(self.total - self.reported, 0.0))
        self.reported = self.total


# ----------------------------------------------------------------------------------------------------- text


@dataclass
class Prompt:
    """One line of a JSONL prompt file: its id (the ``id`` field, else its line number from 0) and its text."""

    id: object
    text: str


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of a JSONL file: one JSON object per line with ``text`` (or ``prompt``) and an optional ``id``;
    blank lines are ignored. A bad line or a repeated id is a ValueError naming the line."""
    prompts, ids = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the prompt file ({error})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f'{path}:{number}: each line needs a "text" (or "prompt") string, e.g. {{"text": "..."}}')
        prompt_id = record.get("id", number - 1)
        if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool):
            raise ValueError(f'{path}:{number}: "id" must be a string or a whole number, got {prompt_id!r}')
        if prompt_id in ids:
            raise ValueError(f"{path}:{number}: id {prompt_id!r} appears twice")
        ids.add(prompt_id)
        prompts.append(Prompt(prompt_id, text))
    if not prompts:
        raise ValueError(f'{path}: no prompts (one JSON object per line, with a "text" field)')
    return prompts


def completed_ids(path: Path) -> set:
    """Ids already in a JSONL output file. A last line cut off by a killed run (no newline, or not JSON) is removed
    from the file, so appending goes on after the last complete line."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished line
    ids = set()
    for line in data[:keep].splitlines():
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{path}: a line is not a result of hf-slim generate; use another --output or --overwrite"
                ) from None
    if keep < len(data):
        with open(path, "r+b") as out:
            out.truncate(keep)
    return ids


def append_lines(path: Path, records: Iterable[dict]) -> None:
    """Append one JSON line per record in a single write, flushed to disk: a kill leaves at most one unfinished
    last line, which :func:`completed_ids` removes."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def generate_batch(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int, num_beams: int = 1) -> list[dict]:
    """Greedy or beam-search outputs of ``texts`` in one padded generate() call: ``{"output", "output_ids"}`` each,
    the ids as generated (the end-of-sequence token included; the padding after it and, for encoder-decoders, the
    decoder start token left out; decoder-only: the new tokens only)."""
    import torch

    device = next(model.parameters()).device
    encoder_decoder = bool(model.config.is_encoder_decoder)
    tokenizer.padding_side = "right" if encoder_decoder else "left"  # decoder-only: new tokens right after each prompt
    inputs = tokenizer(list(texts), return_tensors="pt", padding=True).to(device)
    pad = tokenizer.pad_token_id
    settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        sequences = model.generate(**inputs, **settings)
    # (rows, new tokens): an encoder-decoder's sequences start with the decoder start token, a decoder-only's with
    # the (left-padded) prompt
    new = sequences[:, 1:] if encoder_decoder else sequences[:, inputs["input_ids"].shape[1] :]
    results = []
    for row in new.tolist():
        while row and row[-1] == pad:  # rows that finished early are padded after their end-of-sequence token
            row.pop()
        results.append({"output": tokenizer.decode(row, skip_special_tokens=True), "output_ids": row})
    return results
