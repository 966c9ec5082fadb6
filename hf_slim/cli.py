"""The ``hf-slim`` command line: transcribe, generate, export, verify, memory.

Every command prints its result on stdout, progress bars (tqdm) and notes on stderr. Bad input (a missing file, an
unsupported model, a bad dtype) exits non-zero with one line ``hf-slim <command>: error: ...`` and no traceback;
``HF_SLIM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

from .outputs import FORMATS

DTYPES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip
MODES = ("auto", "input", "k")
#: Whisper windows are 30 s; longer audio is transcribed window by window (sequential long-form generate).
WHISPER_WINDOW_SECONDS = 30.0
WHISPER_SAMPLING_RATE = 16_000
DEFAULT_PROMPT = "The quick brown fox"
#: inputs per generate() call of a bulk job without --batch-size or --max-memory
DEFAULT_BATCH_SIZE = 8
#: files next to the weights that export copies so the exported folder is usable on its own
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "spiece.model", "normalizer.json", "preprocessor_config.json", "processor_config.json",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


#: progress bars made by :func:`_bar` that may still be drawn (weak: a closed, dropped bar disappears by itself)
_OPEN_BARS: weakref.WeakSet = weakref.WeakSet()


class CliError(Exception):
    """Bad input: reported as one line, exit status 1."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a bulk job, with how far it got ("12 of 40 files done; rerun the same command to resume"),
    which :func:`main` adds to its "interrupted" line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block first)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# ----------------------------------------------------------------------------------------------- shared helpers


def _dtype(name: str):
    key = name.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (use fp32, fp16 or bf16)")
    return DTYPES[key]


def _positive_int(text: str) -> int:
    """argparse type for counts and lengths: a zero or negative one would give an empty run or negative bytes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _temperatures(text: str) -> tuple[float, ...]:
    """argparse type for ``--temperature``: ``0``, ``0.7`` or a fallback list ``0,0.2,0.4,0.6,0.8,1.0``."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (0,0.2,0.4), got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"temperatures must be 0 or more, got {text!r}")
    return values


def _memory_size(text: str) -> int:
    """argparse type for ``--max-memory``: ``8GiB``, ``512MiB``, ``2GB``."""
    from .budget import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _device(name: str) -> str:
    """argparse type for ``--device``: a torch device this machine has (torch would fail later, mid-load)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(f"{name!r} holds no weights (shapes only): give a device to run on (cpu/cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: this torch build or machine has no CUDA device (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: MPS is not available on this machine (use cpu)")
    return name


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _bar(total: float, desc: str, unit: str = "step", **shape):
    """A progress bar on stderr, erased when closed, none when stderr is not a terminal (tqdm's ``disable=None``);
    :func:`main` erases the ones an error interrupted. ``shape``: tqdm's ``bar_format`` and ``postfix``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None, **shape)
    _OPEN_BARS.add(bar)
    return bar


def _close_bars() -> None:
    """Erase the progress bars an error or Ctrl-C left open, so the message after them starts on a clean line."""
    for bar in list(_OPEN_BARS):
        bar.close()  # leave=False: overwrites the bar with blanks and returns to the start of the line
    _OPEN_BARS.clear()


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _note(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"note: {message}", file=sys.stderr)  # on its own line, above any progress bar


@contextlib.contextmanager
def _fallback_notes() -> Iterator[None]:
    """Show slimify's K-mode fallbacks as one note each instead of a Python warning."""
    from .calibration import SlimFallbackWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SlimFallbackWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, SlimFallbackWarning):
            lines = str(warning.message).splitlines()
            _note(f"{lines[0]} ({len(lines) - 1} layers)")


@contextlib.contextmanager
def _calibration_progress() -> Iterator[None]:
    """Let slimify draw its per-layer calibration bar: it is transformers' tqdm, which :func:`main` switches off (for
    from_pretrained's weight-loading bars), so it is switched on for the slimify call alone."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    try:
        yield
    finally:
        if not enabled:
            transformers_logging.disable_progress_bar()


def _slimify(model, mode: str, *, notes: bool = True) -> None:
    """``slimify(model, mode)`` with its calibration bar, its K-mode fallbacks as notes (``notes=False``: silenced,
    and no summary line either: for a calibration whose model is not the one reported)."""
    from .api import slimify

    if notes:
        with _calibration_progress(), _fallback_notes():
            slimify(model, mode)
        return
    hf_slim_logger = logging.getLogger("hf_slim")
    level = hf_slim_logger.level
    hf_slim_logger.setLevel(logging.WARNING)
    try:
        with _calibration_progress(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slimify(model, mode)
    finally:
        hf_slim_logger.setLevel(level)


class _StderrLines(logging.Handler):
    """hf_slim's INFO lines (what slimify gave the model) on stderr, each on its own line above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _hf_slim_lines() -> Iterator[None]:
    """Show the ``hf_slim`` logger's INFO lines on stderr for the duration of one command."""
    hf_slim_logger, handler = logging.getLogger("hf_slim"), _StderrLines(logging.INFO)
    level = hf_slim_logger.level
    hf_slim_logger.addHandler(handler)
    hf_slim_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        hf_slim_logger.removeHandler(handler)
        hf_slim_logger.setLevel(level)


#: config attributes giving the size of a learned position table, decoder's first (T5's relative positions have none)
_POSITION_LIMITS = ("max_target_positions", "n_positions", "max_position_embeddings")


def _position_limit(config) -> tuple[str, int] | None:
    """``(attribute, decoder positions)`` of a model with a learned position table; None without one (T5, and RoPE or
    ALiBi models, whose positions are computed and run past the configured length)."""
    from .registry import SUPPORTED

    architecture = SUPPORTED.get(getattr(config, "model_type", None))
    if architecture is not None and architecture.positions in ("rope", "alibi", "relative_bias"):
        return None
    name = next((name for name in _POSITION_LIMITS if isinstance(getattr(config, name, None), int)), None)
    return None if name is None else (name, getattr(config, name))


def _model_folder(path: str | None) -> Path:
    """The checkpoint folder: ``path``, or the bundled Whisper tiny.en (converted on first use) when None."""
    if path is None:
        from .bundled import whisper_tiny_en_dir

        return whisper_tiny_en_dir()
    folder = Path(path)
    if not folder.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise CliError(
            f"model folder not found: {folder}; --model takes a local checkpoint folder (nothing is downloaded): to "
            f"use the Hub model {path}, download it first with: hf download {path} --local-dir DIR"
        )
    if not folder.exists():
        raise CliError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise CliError(f"--model must be a checkpoint folder, got a file: {folder}")
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} has no config.json: not a transformers checkpoint folder")
    return folder


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CliError(f"{folder / 'config.json'}: unreadable ({error})") from error


def _check_supported(config, mode: str | None) -> None:
    from .registry import architecture_for

    architecture_for(config, mode or "auto")  # raises UnsupportedModelError with the reason


def load_model(path: str | None, dtype: str, mode: str | None, device: str, *, slim: bool = True):
    """Load a checkpoint folder (plain or slim) and return ``(model, folder)``; slimified unless ``slim=False``.

    A slim checkpoint is loaded with :func:`hf_slim.load_slim` (its recorded layer modes) unless ``mode`` asks for
    another mode, in which case its plain weights are slimified again.
    """
    from transformers import AutoConfig

    from .export import CONFIG_KEY, _model_class, read_slim_settings
    from .load import load_slim

    folder = _model_folder(path)
    raw = _read_config(folder)
    if "model_type" not in raw:
        raise CliError(f"{folder / 'config.json'} has no model_type: not a transformers model config")
    _check_supported(AutoConfig.from_pretrained(folder), mode)
    torch_dtype = _torch_dtype(dtype)
    with _bar(2, f"loading {folder.name}") as bar:
        recorded = read_slim_settings(folder)["requested_mode"] if CONFIG_KEY in raw else None
        if slim and recorded is not None and mode in (None, recorded):
            model = load_slim(folder, dtype=torch_dtype).to(device)
            bar.update(2)
        else:
            model = _model_class(folder).from_pretrained(folder, dtype=torch_dtype).to(device)
            if CONFIG_KEY in vars(model.config):
                delattr(model.config, CONFIG_KEY)
            bar.update()
            if slim:
                _slimify(model, mode or recorded or "auto")
            bar.update()
    return model.eval(), folder


def _slim_summary(model) -> str:
    from .api import slim_record

    modes = list(slim_record(model).layer_modes.values())
    counts = ", ".join(f"{modes.count(mode)} {mode}" for mode in ("input", "k", "kv", "encoder") if mode in modes)
    return f"slim layers: {counts}"


# --------------------------------------------------------------------------------------------------- transcribe


class _PeakCacheMeter:
    """Largest ``cache_nbytes`` of the cache any forward call of ``model`` returned (long-form generate keeps no
    cache in its result, so the cache is measured while it is alive)."""

    def __init__(self, model) -> None:
        self.peak = 0
        self.model = model

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, module, args, output) -> None:
        from ._compat import returned_cache
        from .cache import cache_nbytes

        cache = returned_cache(output)
        if cache is not None:
            self.peak = max(self.peak, cache_nbytes(cache))


def _report_failure(prog: str) -> callable:
    """One line per bad input, written above the progress bar (which goes on: the job does)."""

    def report(path: Path, reason: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"{prog}: error: {reason}", file=sys.stderr)  # the reason names the file

    return report


def _unpatched_batch(slim, vanilla) -> str:
    """``"batch N (R x)"``: the unpatched model's batch in the budget and how many times larger slim's is."""
    vanilla_batch = 0 if vanilla is None else vanilla.batch_size
    ratio = f" ({slim.batch_size / vanilla_batch:.1f}x)" if vanilla_batch else ""
    return f"batch {vanilla_batch}{ratio}"


def _whisper_budget(model, args, *, slim: bool, budget: int | None = None, batch_size: int | None = None):
    """:func:`hf_slim.budget.largest_batch` (``budget``) or :func:`hf_slim.budget.batch_memory` (``batch_size``)
    for 30 s Whisper windows: 1500 encoder frames, the decoder up to the generation limit (448 positions)."""
    from .budget import batch_memory, largest_batch

    limit = model.config.max_target_positions
    prompt = 4  # <|startoftranscript|>, language, task, <|notimestamps|>
    seq_len = min(limit, prompt + args.max_new_tokens) if args.max_new_tokens else limit
    shape = dict(encoder_len=model.config.max_source_positions, prompt_len=prompt, num_beams=args.num_beams)
    if budget is not None:
        return largest_batch(model, budget, seq_len, slim=slim, **shape)
    return batch_memory(model, batch_size, seq_len, slim=slim, **shape)


def _plan_batch(model, args, files: int) -> tuple[int, int]:
    """``(batch size, encoder micro-batch)``: ``--batch-size``, or the largest slim batch in ``--max-memory``
    (printed next to what the unpatched model would get in the same budget)."""
    if args.max_memory is None:
        plan = _whisper_budget(model, args, slim=True, batch_size=args.batch_size)
        return args.batch_size, plan.encoder_batch
    slim = _whisper_budget(model, args, slim=True, budget=args.max_memory)
    if slim is None:
        one = _whisper_budget(model, args, slim=True, batch_size=1)
        raise CliError(
            f"--max-memory {_human(args.max_memory)} is too small for one 30 s window of this model: it needs about "
            f"{_human(one.peak)} (cache, encoder output and activations, estimated)"
        )
    vanilla = _whisper_budget(model, args, slim=False, budget=args.max_memory)
    _note(
        f"--max-memory {_human(args.max_memory)}: batch {slim.batch_size} of 30 s windows, {args.num_beams} "
        f"beam(s) each (slim cache, encoder output and activations, estimated: {_human(slim.peak)}); the unpatched "
        f"model would get {_unpatched_batch(slim, vanilla)} in the same budget"
    )
    if files < slim.batch_size:
        _note(f"using batch {files}: there are {files} files to transcribe")
    batch = min(slim.batch_size, files)
    return batch, min(slim.encoder_batch, batch)


class _AudioProgress:
    """The bar of a transcription job: audio seconds done of the total (so its rate is audio seconds per second and
    its ETA weighs long files as they are), and files done of the files::

        transcribing:  45%|████▌     | 120/267 s audio, 18/40 files [00:20<00:25,  6.00 s audio/s]
    """

    FORMAT = (
        "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s audio{postfix} [{elapsed}<{remaining}, "
        "{rate_noinv_fmt}]"
    )

    def __init__(self, tasks, desc: str) -> None:
        self.files, self.total_files = 0, len(tasks)
        seconds = sum(task.duration for task in tasks)
        self.bar = _bar(seconds, desc, " s audio", bar_format=self.FORMAT, postfix=f"0/{self.total_files} files")

    def __call__(self, files: int, seconds: float) -> None:
        """``files`` more files written, ``seconds`` more audio transcribed."""
        self.files += files
        self.bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)
        self.bar.update(seconds)
        if files:  # a batch is written: show it now (update draws at most every 0.1 s, and not for 0 seconds)
            self.bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _whisper_options(args):
    """The :class:`hf_slim.transcription.WhisperOptions` of the command line. Several temperatures without
    thresholds get transformers' documented fallback thresholds (compression ratio 1.35, over token bytes, and
    log-probability -1.0): without a threshold no window would ever fall back."""
    from .transcription import WhisperOptions

    fallback = len(args.temperature) > 1
    compression = args.compression_ratio_threshold
    logprob = args.logprob_threshold
    return WhisperOptions(
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, language=args.language, task=args.task,
        word_timestamps=args.word_timestamps, prompt=args.initial_prompt,
        condition_on_previous_text=args.condition_on_previous_text, temperature=args.temperature,
        compression_ratio_threshold=1.35 if compression is None and fallback else compression,
        logprob_threshold=-1.0 if logprob is None and fallback else logprob,
        no_speech_threshold=args.no_speech_threshold, seed=args.seed,
    )  # fmt: skip


def _check_whisper_options(folder: Path, options) -> None:
    """Refuse options the checkpoint's Whisper cannot honour (a language for tiny.en, word timestamps without
    alignment heads) from its generation config, before any weight or audio is read."""
    from transformers import GenerationConfig

    from .transcription import check_options

    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError as error:
        raise CliError(f"{folder} has no generation_config.json, which Whisper's generate needs ({error})") from error
    check_options(generation_config, options)


def cmd_transcribe(args) -> int:
    from .bulk import JobReport, check_audio, plan_audio_job

    prog = "hf-slim transcribe"
    if args.format != "txt" and args.output_dir is None:
        raise CliError(f"--format {args.format} writes files: give --output-dir DIR")
    if args.ray is not None and args.compare:
        raise CliError("--compare runs in one process: leave out --ray")
    if args.audio:
        arguments = args.audio
    else:
        from .bundled import sample_audio_path

        arguments = [str(sample_audio_path())]
    output_dir = Path(args.output_dir) if args.output_dir else None
    tasks, skipped = plan_audio_job(arguments, output_dir, args.format, resume=not args.overwrite)
    folder = _model_folder(args.model)
    model_type = _read_config(folder).get("model_type")
    if model_type != "whisper":
        raise CliError(f"transcribe needs a Whisper model; {folder} is {model_type!r} (use hf-slim generate)")
    options = _whisper_options(args)
    _check_whisper_options(folder, options)
    report = JobReport(skipped=skipped)
    inputs = len(tasks) + skipped
    if skipped:
        _note(f"skipping {skipped} file(s) whose {args.format} output exists (--overwrite redoes them)")
    tasks = check_audio(tasks, report, _report_failure(prog))  # bad files are reported before the model loads
    if not tasks:
        return _transcribe_summary(args, report, output_dir)
    try:
        if args.ray is not None:
            return _transcribe_on_ray(args, options, tasks, report, output_dir, folder)
        processor = _whisper_processor(folder)
        model, _ = load_model(str(folder), args.dtype, args.mode, args.device)
        batch_size, encoder_batch = _plan_batch(model, args, len(tasks))
        if args.compare:
            return _transcribe_compare(args, options, model, processor, tasks, batch_size, encoder_batch, report)
        return _transcribe_here(args, options, model, processor, tasks, batch_size, encoder_batch, report, output_dir)
    except KeyboardInterrupt:
        done = f"{report.done + report.skipped} of {inputs} files done"
        failed = f", {len(report.failed)} failed" if report.failed else ""
        resume = "; rerun the same command to resume" if output_dir is not None else ""
        raise JobInterrupted(f"{done}{failed}{resume}") from None


def _transcribe_here(args, options, model, processor, tasks, batch_size, encoder_batch, report, output_dir) -> int:
    """The job in this process: batches through :func:`hf_slim.bulk.transcribe_tasks`, the transcripts printed as
    each batch finishes when there is no output folder."""
    from .bulk import transcribe_tasks

    started = time.monotonic()
    printed = 0
    with _AudioProgress(tasks, "transcribing") as bar:

        def progress(files: int, seconds: float) -> None:
            nonlocal printed
            bar(files, seconds)
            if output_dir is None and files:  # print each batch's transcripts as it finishes
                for path, result in list(report.results.items())[printed:]:
                    bar.bar.clear()
                    print(f"{path.name}: {result.text}" if len(tasks) > 1 else result.text, flush=True)
                printed = len(report.results)

        transcribe_tasks(
            model, processor, tasks, batch_size=batch_size, fmt=args.format, options=options,
            encoder_batch=encoder_batch, report=report, on_failure=_report_failure("hf-slim transcribe"),
            progress=progress,
        )  # fmt: skip
    return _transcribe_summary(args, report, output_dir, time.monotonic() - started)


def _transcribe_on_ray(args, options, tasks, report, output_dir: Path | None, folder: Path) -> int:
    from .raydata import transcribe_tasks_on_ray

    model = _meta_model_of(folder, args.dtype)  # shapes for the batch plan; each actor loads the real weights
    batch_size, encoder_batch = _plan_batch(model, args, len(tasks))
    address = None if args.ray == "local" else args.ray
    started = time.monotonic()
    with _AudioProgress(tasks, f"transcribing on Ray ({args.workers} workers)") as bar:
        transcribe_tasks_on_ray(
            tasks, load=load_whisper, address=address, workers=args.workers, model=args.model, dtype=args.dtype,
            mode=args.mode, device=args.device, batch_size=batch_size, fmt=args.format, options=options,
            encoder_batch=encoder_batch, report=report, on_failure=_report_failure("hf-slim transcribe"),
            progress=bar,
        )  # fmt: skip
    if output_dir is None:
        for path, transcript in report.results.items():
            print(f"{path.name}: {transcript.text}" if len(report.results) > 1 else transcript.text)
    return _transcribe_summary(args, report, output_dir, time.monotonic() - started)


def _speed(audio_seconds: float, elapsed: float) -> str:
    """``"267.4 s of audio in 20.3 s, 13.2x real time (real-time factor 0.076)"``: the real-time factor is the
    processing time per second of audio (below 1: faster than real time)."""
    elapsed = max(elapsed, 1e-3)
    return (
        f"{audio_seconds:.1f} s of audio in {elapsed:.1f} s, {audio_seconds / elapsed:.1f}x real time "
        f"(real-time factor {elapsed / max(audio_seconds, 1e-3):.3g})"
    )


def _transcribe_summary(args, report, output_dir: Path | None, elapsed: float | None = None) -> int:
    """The closing line and the exit status (1 if any input failed): with --output-dir, on stdout, what was written
    and how fast; printing transcripts, on stderr (stdout keeps the transcripts alone), for more than one file."""
    audio = sum(result.duration for result in report.results.values())
    speed = f": {_speed(audio, elapsed)}" if elapsed is not None and report.done else ""
    if output_dir is not None:
        parts = [f"{report.skipped} skipped (already done)"] if report.skipped else []
        parts += [f"{len(report.failed)} failed"] if report.failed else []
        extra = f" ({', '.join(parts)})" if parts else ""
        print(f"wrote {report.done} {args.format} file(s) to {output_dir}{extra}{speed}")
    elif report.done + len(report.failed) > 1 and (report.failed or speed):
        failed = f" ({len(report.failed)} of {report.done + len(report.failed)} files failed)" if report.failed else ""
        sys.stderr.write(f"hf-slim transcribe: transcribed {report.done} file(s){speed}{failed}\n")
    return 1 if report.failed else 0


def _transcribe_compare(args, options, model, processor, tasks, batch_size, encoder_batch, report) -> int:
    """Slim, then the unpatched model (unslimify), over the same batches; per file both transcripts, the peak cache
    bytes of its batch on each side, and whether the results are identical (token ids, text, segments and word
    timings)."""
    from dataclasses import asdict

    from .api import unslimify
    from .bulk import batches, decode_batch
    from .outputs import render, write_atomic
    from .transcription import transcribe_batch

    options = options.for_format(args.format)
    planned = []
    for batch in batches(tasks, batch_size):
        decoded = decode_batch(batch)
        for task, samples in zip(batch, decoded, strict=True):
            if isinstance(samples, str):
                report.failed.append((task.path, samples))
                _report_failure("hf-slim transcribe")(task.path, samples)
        kept = [(task, samples) for task, samples in zip(batch, decoded, strict=True) if not isinstance(samples, str)]
        if kept:
            planned.append(kept)
    runs: dict[str, list] = {"slim": [], "vanilla": []}
    with _bar(2 * sum(len(batch) for batch in planned), "transcribing", unit="file") as bar:
        for run in runs:
            if run == "vanilla":
                unslimify(model)
            for batch in planned:
                with _PeakCacheMeter(model) as meter:
                    clips = [samples for _, samples in batch]
                    results = transcribe_batch(model, processor, clips, options, encoder_batch=encoder_batch)
                runs[run].append((results, meter.peak))
                bar.update(len(batch))
    encoder_bytes = _whisper_encoder_bytes(model)
    identical = 0
    for batch, (slim_results, slim_bytes), (vanilla_results, vanilla_bytes) in zip(
        planned, runs["slim"], runs["vanilla"], strict=True
    ):
        rows = f", batch of {len(batch)}" if len(batch) > 1 else ""
        encoder = encoder_bytes * len(batch)
        for (task, samples), slim, vanilla in zip(batch, slim_results, vanilla_results, strict=True):
            seconds = len(samples) / WHISPER_SAMPLING_RATE
            count = -(-len(samples) // int(WHISPER_WINDOW_SECONDS * WHISPER_SAMPLING_RATE))
            windows = f", {count} windows of 30 s, peak cache per window" if count > 1 else ""
            ratio = vanilla_bytes / max(slim_bytes, 1)
            ratio_e = (vanilla_bytes + encoder) / max(slim_bytes + encoder, 1)
            same = asdict(slim) == asdict(vanilla)
            identical += same
            print(f"{task.path.name} ({seconds:.1f} s{windows})")
            print(f"  slim:    {slim.text}")
            print(f"  vanilla: {vanilla.text}")
            print(
                f"  cache bytes{rows}: slim {slim_bytes} ({_human(slim_bytes)}), vanilla {vanilla_bytes} "
                f"({_human(vanilla_bytes)}), ratio {ratio:.1f}x; counting the encoder output both keep "
                f"({_human(encoder)}): {ratio_e:.2f}x"
            )
            print(f"  transcripts identical: {'yes' if same else 'NO'}")  # token ids, text, segments, words
            if task.output is not None:
                write_atomic(task.output, render(slim, args.format, source=str(task.path)))
            report.results[task.path] = slim
            report.done += 1
    if len(report.results) > 1:
        print(f"identical transcripts (token ids, text, timings): {identical} of {len(report.results)} files")
    return _transcribe_summary(args, report, Path(args.output_dir) if args.output_dir else None)


def load_whisper(model: str | None, dtype: str, mode: str | None, device: str):
    """``(slim Whisper, its processor)`` for a bulk worker (Ray ships this function to its actors by name)."""
    loaded, folder = load_model(model, dtype, mode, device)
    return loaded, _whisper_processor(folder)


def load_text_model(model: str, dtype: str, mode: str | None, device: str):
    """``(slim model, its tokenizer with a pad token)`` for a bulk worker, as :func:`load_whisper`."""
    loaded, folder = load_model(model, dtype, mode, device)
    return loaded, _prepared_tokenizer(folder)


def _whisper_processor(folder: Path):
    from transformers import WhisperProcessor

    try:
        return WhisperProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise CliError(f"{folder} has no Whisper processor files (preprocessor and tokenizer): {error}") from error


def _whisper_encoder_bytes(model, batch: int = 1) -> int:
    config = model.config
    return batch * config.max_source_positions * config.d_model * next(model.parameters()).element_size()


# ----------------------------------------------------------------------------------------------------- generate


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CliError(f"{folder} has no usable tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CliError(f"{folder} has no usable tokenizer files ({str(error).splitlines()[0]})") from error


def _token_progress(total: int, desc: str):
    """A generate() streamer that advances a tqdm bar once per generated token."""
    from transformers.generation.streamers import BaseStreamer

    class TokenProgress(BaseStreamer):
        def __init__(self) -> None:
            self.bar, self.first = _bar(total, desc), True

        def put(self, value) -> None:
            if self.first:  # the prompt (decoder-only) or the decoder start token (encoder-decoder)
                self.first = False
                return
            self.bar.update()

        def end(self) -> None:
            self.bar.close()

    return TokenProgress()


def _check_length(config, prompt_tokens: int, max_new_tokens: int, prompt: str = "the prompt") -> None:
    """Refuse a prompt (plus new tokens) longer than the model's position table, which fails deep inside generate
    with ``IndexError: index out of range in self``."""
    if config.is_encoder_decoder or _position_limit(config) is None:  # Whisper's generate checks its own limit
        return
    name, limit = _position_limit(config)
    where = f"this {config.model_type} model has {limit} positions ({name})"
    if prompt_tokens >= limit:
        raise CliError(f"{prompt} is {prompt_tokens} tokens, but {where}: shorten it to fewer than {limit} tokens")
    if prompt_tokens + max_new_tokens > limit:
        raise CliError(
            f"{prompt} ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} needs "
            f"{prompt_tokens + max_new_tokens} positions, but {where}: use --max-new-tokens {limit - prompt_tokens} "
            "or less, or a shorter prompt"
        )


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, num_beams: int = 1):
    """Greedy (or beam-search) continuation of ``prompt``: ``(text, cache_bytes)`` with the bytes of the cache
    generate returned."""
    import torch

    from ._compat import returned_cache
    from .cache import cache_nbytes

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    if inputs["input_ids"].shape[1] == 0:
        raise CliError("the prompt is empty after tokenization")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, return_dict_in_generate=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        settings["pad_token_id"] = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**inputs, **settings, streamer=_token_progress(max_new_tokens, "generating"))
    new_tokens = (
        out.sequences[0] if model.config.is_encoder_decoder else out.sequences[0, inputs["input_ids"].shape[1] :]
    )
    return tokenizer.decode(new_tokens, skip_special_tokens=True), cache_nbytes(returned_cache(out))


def cmd_generate(args) -> int:
    from .api import unslimify

    folder = _model_folder(args.model)
    if _read_config(folder).get("model_type") == "whisper":
        raise CliError(f"{folder} is a Whisper speech model: use hf-slim transcribe")
    if args.input is None:
        for option in ("output", "ray", "max_memory"):
            if getattr(args, option) is not None:
                raise CliError(f"--{option.replace('_', '-')} is for bulk jobs: give --input PROMPTS.jsonl")
        if args.batch_size_given:
            raise CliError("--batch-size is for bulk jobs: give --input PROMPTS.jsonl")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    _check_supported(config, args.mode)  # before the tokenizer: the clearer error first
    if args.input is not None:
        return _generate_bulk(args, folder, config)
    tokenizer = _tokenizer(folder)
    _check_length(config, len(tokenizer(args.prompt)["input_ids"]), args.max_new_tokens)  # before loading weights
    model, _ = load_model(args.model, args.dtype, args.mode, args.device)
    text, slim_bytes = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.num_beams)
    if not args.compare:
        print(text)
        return 0
    unslimify(model)
    vanilla_text, vanilla_bytes = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.num_beams)
    print(f"slim:    {text}")
    print(f"vanilla: {vanilla_text}")
    print(
        f"cache bytes: slim {slim_bytes} ({_human(slim_bytes)}), vanilla {vanilla_bytes} ({_human(vanilla_bytes)}), "
        f"ratio {vanilla_bytes / max(slim_bytes, 1):.2f}x"
    )
    print(f"outputs identical: {'yes' if text == vanilla_text else 'NO'}")
    return 0


def _prepared_tokenizer(folder: Path):
    """The checkpoint's tokenizer with a pad token (batches are padded; decoder-only models often have none)."""
    tokenizer = _tokenizer(folder)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(
                f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token to pad batches with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_budget(model, args, longest: int, *, slim: bool, budget: int | None = None, batch_size: int | None = None):
    """:func:`hf_slim.budget` for prompts of ``longest`` tokens: encoder-decoders encode them and decode
    ``--max-new-tokens``; decoder-only models prefill them and grow the cache by ``--max-new-tokens``."""
    from .budget import batch_memory, largest_batch

    if model.config.is_encoder_decoder:
        shape = dict(seq_len=args.max_new_tokens + 1, encoder_len=longest, prompt_len=1)
    else:
        shape = dict(seq_len=longest + args.max_new_tokens, prompt_len=longest)
    if budget is not None:
        return largest_batch(model, budget, slim=slim, num_beams=args.num_beams, **shape)
    return batch_memory(model, batch_size, slim=slim, num_beams=args.num_beams, **shape)


def _generate_bulk(args, folder: Path, config) -> int:
    """``--input PROMPTS.jsonl --output OUT.jsonl``: batches of prompts in input order, one output line per prompt
    (``{"id", "output", "output_ids"}``) appended as each batch finishes; ids already in OUT.jsonl are skipped."""
    from .bulk import append_lines, batches, completed_ids, generate_batch, read_prompts

    prompts = read_prompts(Path(args.input))
    if args.output is None:
        raise CliError("--input needs --output OUT.jsonl (results are appended there, resumable)")
    output = Path(args.output)
    if args.overwrite:
        output.unlink(missing_ok=True)
    done = completed_ids(output)
    pending = [prompt for prompt in prompts if prompt.id not in done]
    skipped = len(prompts) - len(pending)
    if skipped:
        _note(f"skipping {skipped} prompt(s) already in {output} (--overwrite redoes them)")
    if not pending:
        print(f"wrote 0 results to {output} ({skipped} skipped (already done))")
        return 0
    tokenizer = _prepared_tokenizer(folder)
    lengths = [len(tokenizer(prompt.text)["input_ids"]) for prompt in pending]
    longest = max(lengths)
    empty = [prompt.id for prompt, length in zip(pending, lengths, strict=True) if length == 0]
    if empty:
        raise CliError(f"prompt {empty[0]!r} is empty after tokenization")
    _check_length(
        config, longest, args.max_new_tokens, f"the longest prompt (id {pending[lengths.index(longest)].id!r})"
    )
    if args.ray is not None:
        model = _meta_model_of(folder, args.dtype)
    else:
        model, _ = load_model(args.model, args.dtype, args.mode, args.device)
    batch_size = args.batch_size
    if args.max_memory is not None:
        slim = _text_budget(model, args, longest, slim=True, budget=args.max_memory)
        if slim is None:
            raise CliError(f"--max-memory {_human(args.max_memory)} is too small for one prompt of {longest} tokens")
        vanilla = _text_budget(model, args, longest, slim=False, budget=args.max_memory)
        _note(
            f"--max-memory {_human(args.max_memory)}: batch {slim.batch_size} (prompts of up to {longest} tokens, "
            f"{args.max_new_tokens} new tokens, {args.num_beams} beam(s); slim cache, encoder output and activations, "
            f"estimated: {_human(slim.peak)}); the unpatched model would get {_unpatched_batch(slim, vanilla)}"
        )
        batch_size = min(slim.batch_size, len(pending))
    started, done = time.monotonic(), 0
    try:
        with _bar(len(pending), "generating" + (f" on Ray ({args.workers} workers)" if args.ray else ""),
                  unit="prompt") as bar:  # fmt: skip

            def progress(count: int) -> None:
                nonlocal done
                done += count
                bar.update(count)

            if args.ray is not None:
                from .raydata import generate_on_ray

                generate_on_ray(
                    pending, output, load=load_text_model, address=None if args.ray == "local" else args.ray,
                    workers=args.workers, model=str(folder), dtype=args.dtype, mode=args.mode, device=args.device,
                    batch_size=batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                    progress=progress,
                )  # fmt: skip
            else:
                for batch in batches(pending, batch_size):
                    results = generate_batch(
                        model, tokenizer, [prompt.text for prompt in batch], max_new_tokens=args.max_new_tokens,
                        num_beams=args.num_beams,
                    )  # fmt: skip
                    append_lines(
                        output, [{"id": prompt.id} | result for prompt, result in zip(batch, results, strict=True)]
                    )
                    progress(len(batch))
    except KeyboardInterrupt:
        raise JobInterrupted(
            f"{done + skipped} of {len(prompts)} prompts done; rerun the same command to resume"
        ) from None
    elapsed = max(time.monotonic() - started, 1e-3)
    extra = f" ({skipped} skipped (already done))" if skipped else ""
    print(f"wrote {done} results to {output}{extra} in {elapsed:.1f} s ({done / elapsed:.2f} prompts/s)")
    return 0


# ------------------------------------------------------------------------------------------------------- export


def _identity(path: Path) -> tuple[int, int]:
    """``(inode, modification time)``: changes when a file is written or replaced."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def cmd_export(args) -> int:
    from .api import slim_record
    from .export import SIDECAR
    from .outputs import give_default_permissions

    out = Path(args.out)
    source = _model_folder(args.model)
    if out.exists() and out.resolve() == source.resolve():
        raise CliError("--out must be another folder than --model (the weights are read while saving)")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out exists and is not a folder: {out}")
    model, folder = load_model(args.model, args.dtype, args.mode, "cpu")
    before = {path: _identity(path) for path in out.iterdir()} if out.is_dir() else {}
    with _bar(1, f"saving {out}") as bar:
        model.save_pretrained(out)
        copied = []
        for name in _SIDE_FILES:
            if (folder / name).is_file():
                copied.append(Path(shutil.copy2(folder / name, out / name)))
        # safetensors writes owner-only files, copy2 keeps the source's mode: what this save wrote gets the umask's
        written = [path for path in out.iterdir() if before.get(path) != _identity(path)]
        give_default_permissions({*written, *copied})
        bar.update()
    record = slim_record(model)
    print(f"exported slim checkpoint to {out} (mode {record.requested_mode}; {_slim_summary(model)})")
    if (out / SIDECAR).is_file():
        print(f"K-mode weights in {out / SIDECAR}")
    return 0


# ------------------------------------------------------------------------------------------------------- verify


def _sample_inputs(model, folder: Path, args) -> dict:
    """A real sample input for the greedy comparison: the sample (or given) audio for Whisper, a prompt otherwise."""
    parameter = next(model.parameters())
    if model.config.model_type == "whisper":
        from .audio import load_audio
        from .bundled import sample_audio_path

        samples, _ = load_audio(args.audio or str(sample_audio_path()), WHISPER_SAMPLING_RATE)
        extractor = _whisper_processor(folder).feature_extractor
        features = extractor(samples, sampling_rate=WHISPER_SAMPLING_RATE, return_tensors="pt").input_features
        return {"input_features": features.to(device=parameter.device, dtype=parameter.dtype)}
    import torch

    try:
        tokenizer = _tokenizer(folder)
        return dict(tokenizer(args.prompt, return_tensors="pt").to(parameter.device))
    except CliError:
        _note(f"no tokenizer in {folder}: comparing on fixed token ids instead of the prompt")
        ids = torch.arange(1, 17, device=parameter.device)[None] % model.config.vocab_size
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _greedy(model, inputs: dict, max_new_tokens: int):
    import torch

    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if model.config.model_type != "whisper":
        settings["min_new_tokens"] = max_new_tokens  # compare a long path, not an early end of sequence
        settings["pad_token_id"] = getattr(model.generation_config, "pad_token_id", None) or 0
    with torch.inference_mode():
        return model.generate(**inputs, **settings)


def cmd_verify(args) -> int:
    from .api import slim_record, unslimify
    from .export import CONFIG_KEY
    from .registry import architecture_for

    model_type = "whisper" if args.model is None else _read_config(_model_folder(args.model)).get("model_type")
    if args.audio is not None and model_type != "whisper":
        raise CliError(f"--audio is for Whisper models; {model_type} takes text (use --prompt)")
    model, folder = load_model(args.model, args.dtype, args.mode, args.device, slim=False)
    recorded = _read_config(folder).get(CONFIG_KEY)
    mode = args.mode or (recorded["requested_mode"] if isinstance(recorded, dict) else None) or "auto"
    inputs = _sample_inputs(model, folder, args)
    if "input_ids" in inputs:
        _check_length(model.config, inputs["input_ids"].shape[1], args.max_new_tokens, "the --prompt")
    steps = _bar(3, "verifying")
    expected = _greedy(model, inputs, args.max_new_tokens)
    steps.update()
    # the K-mode calibration numbers of every layer, whichever mode is verified: they say what the K cache would cost.
    # One calibration: where the verified mode is K mode (auto on RoPE models is), its own slimify gives them
    k_mode = mode == "k" or (mode == "auto" and architecture_for(model.config, mode).positions == "rope")
    calibration = {}
    if not k_mode:
        try:
            _slimify(model, "k", notes=False)
            calibration = dict(slim_record(model).calibration)
            unslimify(model)
        except ValueError as error:  # no K mode for this architecture (e.g. e != d): no numbers
            _note(f"no K-mode numbers: {error}")
    _slimify(model, mode)
    if k_mode:
        calibration = dict(slim_record(model).calibration)
    steps.update()
    actual = _greedy(model, inputs, args.max_new_tokens)
    steps.update()
    steps.close()

    record = slim_record(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{folder.name}: {model.config.model_type}, {dtype}, mode {mode}")
    print(
        f"{'layer':<34} {'mode':<8} {'cond(W_K)':>10} {'r':>5} {'V err K+R cache':>16} {'V err unmodified':>17} "
        f"{'V err this mode':>16} {'ratio':>6}"
    )
    for name, layer_mode in record.layer_modes.items():
        numbers = calibration.get(name, {})  # a layer refused before any rank was tried has cond(W_K) only

        def number(key: str, width: int, spec: str, numbers=numbers) -> str:
            return f"{numbers[key]:>{width}{spec}}" if key in numbers else f"{'-':>{width}}"

        chosen = "k_error" if layer_mode == "k" else "vanilla_error"
        # input cache: d per token against 2d for K+V; kv: the model's own K and V
        ratio = numbers.get("cache_ratio") if layer_mode == "k" else {"kv": 1.0}.get(layer_mode, 2.0)
        ratio = ratio if "k_error" in numbers else None
        rank = "-"
        if "residual_rank" in numbers:  # +s: one more column, the key scale
            rank = f"{numbers['residual_rank']}{'+s' if numbers.get('key_scale') else ''}"
        print(
            f"{name:<34} {layer_mode:<8} {number('cond_w_k', 10, '.3g')} {rank:>5} {number('k_error', 16, '.2e')} "
            f"{number('vanilla_error', 17, '.2e')} {number(chosen, 16, '.2e')} "
            + (f"{ratio:>5.2f}x" if ratio is not None else f"{'-':>6}")
        )
    print(
        "(r: input directions the K+R cache keeps beside K, the smallest that calibrates exact, or the largest tried "
        "where K mode is refused, +s: one more column, each token's key scale, for keys normalised per token; "
        "V err: relative error of the values against float64, on calibration data, in the "
        "model dtype; ratio: K+V bytes / this layer's cache bytes)"
    )
    if "kv" in record.layer_modes.values():
        print("(kv: the layer keeps the model's own keys and values; the other layers keep one tensor)")
    from .memory import cache_report

    report = cache_report(model, 1, actual.shape[-1], verbose=False)
    print(
        f"cache at {actual.shape[-1]} tokens, batch 1: {_human(report.vanilla_bytes)} vanilla, "
        f"{_human(report.slim_bytes)} slim ({report.ratio:.2f}x)"
    )
    same = expected.shape == actual.shape and bool((expected == actual).all())
    tokens = actual.shape[-1]
    if same:
        print(f"greedy outputs: identical to the unpatched model ({tokens} tokens)")
        return 0
    print(f"greedy outputs: DIFFER from the unpatched model (slim {actual.tolist()}, vanilla {expected.tolist()})")
    return 1


# ------------------------------------------------------------------------------------------------------- memory


def _meta_model(args):
    """The model of ``--model`` or ``--config``, built on the meta device (no weights are read or allocated)."""
    from transformers import AutoConfig

    if args.config is not None:
        path = Path(args.config)
        if path.is_dir():
            raise CliError(f"--config takes a config.json file; {path} is a folder (use --model {path})")
        if not path.is_file():
            raise CliError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CliError(f"{path}: not a JSON config ({error})") from error
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise CliError(f"{path}: a transformers config.json with a model_type is needed")
        try:
            config = AutoConfig.for_model(**raw)
        except (ValueError, KeyError) as error:
            raise CliError(f"{path}: {str(error).splitlines()[0]}") from error
    else:
        folder = _model_folder(args.model)
        raw = _read_config(folder)
        config = AutoConfig.from_pretrained(folder)
    return _meta_from_config(config, raw, args.dtype)


def _meta_model_of(folder: Path, dtype: str | None):
    """The checkpoint's model on the meta device: shapes for planning without reading weights."""
    from transformers import AutoConfig

    return _meta_from_config(AutoConfig.from_pretrained(folder), _read_config(folder), dtype)


def _meta_from_config(config, raw: dict, dtype_name: str | None):
    import torch
    import transformers

    _check_supported(config, None)
    names = raw.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    dtype = _torch_dtype(dtype_name) or torch.float32
    with torch.device("meta"):
        if model_class is None:
            return transformers.AutoModel.from_config(config, dtype=dtype)
        return model_class._from_config(config, dtype=dtype)


def _default_seq_len(config) -> int:
    limit = _position_limit(config)
    return 512 if limit is None else limit[1]


def cmd_memory(args) -> int:
    from .memory import cache_report

    if args.plot:
        _check_plot_target(Path(args.plot))  # before any work: the table would be printed, then the plot fail
    model = _meta_model(args)
    if args.encoder_len is not None and not model.config.is_encoder_decoder:
        raise CliError(f"--encoder-len is for encoder-decoder models (Whisper, T5); {model.config.model_type} has none")
    seq_len = _default_seq_len(model.config) if args.seq_len is None else args.seq_len
    limit = _position_limit(model.config)
    if limit is not None and seq_len > limit[1]:
        _note(f"{model.config.model_type} has {limit[1]} positions ({limit[0]}): it cannot run {seq_len} tokens")
    report = cache_report(model, args.batch, seq_len, encoder_len=args.encoder_len, num_beams=args.beams, verbose=False)
    print(report)
    if args.plot:
        _plot(model, report, args.batch, seq_len, args.encoder_len, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


def _check_plot_target(path: Path) -> None:
    """``--plot`` needs matplotlib (an optional extra) and a file type it writes (without a suffix, matplotlib would
    write ``path.png`` and the reported path would not exist)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise CliError(
            '--plot needs matplotlib, which is not installed: pip install "hf-slim[plot]" (or pip install matplotlib)'
        ) from error
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().removeprefix(".") not in formats:
        raise CliError(
            f"--plot {path}: name a .png, .svg or .pdf file (matplotlib writes {', '.join(sorted(formats))})"
        )


def _plot(model, report, batch: int, seq_len: int, encoder_len: int | None, path: Path) -> None:
    """Cache bytes against context length, vanilla vs slim (and with the encoder output, for encoder-decoders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .memory import cache_report

    lengths = np.unique(np.linspace(1, seq_len, 64).astype(int))
    reports = [cache_report(model, batch, int(n), encoder_len=encoder_len, verbose=False) for n in lengths]
    scale, unit = next((1024.0**p, u) for p, u in ((3, "GiB"), (2, "MiB"), (1, "KiB"), (0, "B"))
                       if report.vanilla_bytes + report.encoder_bytes >= 1024.0**p or p == 0)  # fmt: skip
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(lengths, [r.vanilla_bytes / scale for r in reports], label="vanilla KV cache", color="tab:red")
    axes.plot(lengths, [r.slim_bytes / scale for r in reports], label="slim cache", color="tab:blue")
    if report.encoder_bytes:
        axes.plot(lengths, [(r.vanilla_bytes + r.encoder_bytes) / scale for r in reports], "--", color="tab:red",
                  label="vanilla + encoder output")  # fmt: skip
        axes.plot(lengths, [(r.slim_bytes + r.encoder_bytes) / scale for r in reports], "--", color="tab:blue",
                  label="slim + encoder output")  # fmt: skip
    dtype = str(report.dtype).removeprefix("torch.")
    axes.set_title(f"{report.model_type}: cache memory, batch {batch}, {dtype} ({report.ratio:.2f}x at {seq_len})")
    axes.set_xlabel("context length (decoder tokens)")
    axes.set_ylabel(f"cache size ({unit})")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-slim", description="Slim attention for Hugging Face transformers models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description)

    def model_options(sub, *, required: bool = False, bundled: bool = True):
        default = " (default: the bundled Whisper tiny.en)" if bundled and not required else ""
        sub.add_argument("--model", metavar="DIR", required=required, help=f"checkpoint folder{default}")
        sub.add_argument("--dtype", type=_dtype, default="float32", help="fp32 (default), fp16 or bf16")
        sub.add_argument("--mode", choices=MODES, default=None,
                         help="slim mode (default: the checkpoint's recorded mode, else auto)")  # fmt: skip
        sub.add_argument("--device", type=_device, default=None,
                         help="torch device (default: cuda if available, else cpu)")  # fmt: skip

    def whisper_options(sub):
        """The options of transformers' Whisper generate, named as faster-whisper and openai-whisper name them."""
        group = sub.add_argument_group("Whisper decoding (the arguments of transformers' Whisper generate)")
        group.add_argument("--language", default=None, metavar="LANG",
                           help="language of the audio, a code (fr) or name (french); default: detected per file "
                           "(multilingual models; English-only ones take en)")  # fmt: skip
        group.add_argument("--task", choices=("transcribe", "translate"), default=None,
                           help="transcribe (default) or translate to English (multilingual models)")  # fmt: skip
        group.add_argument("--word-timestamps", action="store_true",
                           help="time every word (cross-attention alignment): words in json segments; srt/vtt get "
                           "one cue per word")  # fmt: skip
        group.add_argument("--initial-prompt", default=None, metavar="TEXT",
                           help="text the model is told came before the audio (names, spelling, style)")  # fmt: skip
        group.add_argument("--condition-on-previous-text", action=argparse.BooleanOptionalAction, default=None,
                           help="long files: condition each 30 s window on the previous window's text (default: "
                           "the model's generation config; transformers: no)")  # fmt: skip
        group.add_argument("--temperature", type=_temperatures, default=(0.0,), metavar="T[,T...]",
                           help="0 (default): greedy or beams; above 0: sampling; several (0,0.2,0.4,0.6,0.8,1.0): "
                           "a window whose text fails a threshold is decoded again at the next one")  # fmt: skip
        group.add_argument("--compression-ratio-threshold", type=float, default=None, metavar="R",
                           help="fall back when a window's tokens compress better than R (repetition; over token "
                           "bytes; default with several temperatures: 1.35)")  # fmt: skip
        group.add_argument("--logprob-threshold", type=float, default=None, metavar="L",
                           help="fall back when a window's average token log-probability is below L (default with "
                           "several temperatures: -1.0)")  # fmt: skip
        group.add_argument("--no-speech-threshold", type=float, default=None, metavar="P",
                           help="skip a window as silence when its no-speech probability is above P and its "
                           "log-probability below --logprob-threshold")  # fmt: skip
        group.add_argument("--seed", type=int, default=0,
                           help="random seed of the sampling at temperatures above 0 (default 0)")  # fmt: skip

    def bulk_options(sub, *, unit: str):
        size = sub.add_mutually_exclusive_group()
        size.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                          help=f"{unit} per generate() call (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
        size.add_argument("--max-memory", type=_memory_size, default=None, metavar="SIZE",
                          help="pick the largest batch whose slim cache, encoder output and activations fit SIZE "
                          "(e.g. 8GiB; estimated from the model and the longest input), and print the batch the "
                          "unpatched model would get")  # fmt: skip
        sub.add_argument(
            "--num-beams", type=_positive_int, default=1, metavar="N", help="beam search width (default 1)"
        )
        sub.add_argument("--overwrite", action="store_true",
                         help="redo inputs whose output exists (default: skip them: a run resumes)")  # fmt: skip
        sub.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help='run as a Ray Data pipeline, one slim model per actor: on a local Ray started for '
                         'the job, or on the cluster at ADDRESS (pip install "hf-slim[ray]")')  # fmt: skip
        sub.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                         help="Ray actors, each with its own model (default 2)")  # fmt: skip

    sub = add("transcribe", "transcribe audio files with a slim Whisper",
              "Transcribe audio files (WAV, FLAC, MP3, OGG; M4A with PyAV) with a slim Whisper model, in batches "
              "(30 s windows; longer files window by window), to the terminal or to txt/srt/vtt/json "
              "files.")  # fmt: skip
    sub.add_argument("audio", nargs="*", metavar="PATH",
                     help="audio files, folders (searched recursively) or glob patterns (default: the sample shipped "
                     "with hf_slim)")  # fmt: skip
    model_options(sub)
    bulk_options(sub, unit="files")
    sub.add_argument("--output-dir", metavar="DIR", default=None,
                     help="write one output per input file here (default: print the transcripts)")  # fmt: skip
    sub.add_argument("--format", choices=FORMATS, default="txt",
                     help="output format with --output-dir: txt (default), srt, vtt or json (text, timestamped "
                     "segments, language, token ids)")  # fmt: skip
    sub.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                     help="tokens per 30 s window (default: the model's limit, 448 positions)")  # fmt: skip
    whisper_options(sub)
    sub.add_argument("--compare", action="store_true",
                     help="also run the unpatched model; print both transcripts and both cache sizes")  # fmt: skip
    sub.set_defaults(run=cmd_transcribe)

    sub = add("generate", "generate text with a slim model, one prompt or a JSONL file of them",
              "Text generation with a slim model (greedy or beam search): one PROMPT, or --input PROMPTS.jsonl "
              "(one {\"text\": ..., \"id\": ...} object per line) in batches to --output OUT.jsonl.")  # fmt: skip
    sub.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                     help="text to continue (decoder-only) or to transform (encoder-decoders)")  # fmt: skip
    model_options(sub, required=True, bundled=False)
    sub.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens to generate (default 32)"
    )
    sub.add_argument("--input", metavar="JSONL", default=None, help="prompts, one JSON object per line (bulk job)")
    sub.add_argument("--output", metavar="JSONL", default=None,
                     help='results, one {"id", "output", "output_ids"} line per prompt, appended '
                     "(resumable)")  # fmt: skip
    bulk_options(sub, unit="prompts")
    sub.add_argument("--compare", action="store_true", help="also run the unpatched model and compare")
    sub.set_defaults(run=cmd_generate)

    sub = add("export", "save a slim checkpoint",
              "Load, slimify and save a checkpoint with its slim settings (hf_slim.load_slim reloads it).")  # fmt: skip
    model_options(sub)
    sub.add_argument("--out", metavar="DIR", required=True, help="output folder")
    sub.set_defaults(run=cmd_export)

    sub = add("verify", "check a mode's per-layer error and greedy equality",
              "Per-layer value error of the slim mode in the given dtype (calibration data) and whether greedy "
              "outputs on a sample input match the unpatched model. Exit status 1 if they differ.")  # fmt: skip
    model_options(sub)
    sub.add_argument("--prompt", default=DEFAULT_PROMPT, help="sample text input (text models)")
    sub.add_argument("--audio", default=None, metavar="WAV", help="sample audio (Whisper; default: shipped sample)")
    sub.add_argument("--max-new-tokens", type=_positive_int, default=24, metavar="N", help="greedy tokens to compare")
    sub.set_defaults(run=cmd_verify)

    sub = add("memory", "cache memory report, vanilla vs slim",
              "Vanilla and slim cache bytes per layer, from the config alone (meta device).")  # fmt: skip
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="checkpoint folder (only config.json is read)")
    source.add_argument("--config", metavar="JSON", help="a config.json file")
    sub.add_argument(
        "--seq-len", type=_positive_int, default=None, metavar="N", help="decoder tokens (default: model maximum)"
    )
    sub.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default 1)")
    sub.add_argument("--encoder-len", type=_positive_int, default=None, metavar="N",
                     help="encoder frames/tokens (encoder-decoders; default: Whisper 1500, else seq-len)")  # fmt: skip
    sub.add_argument("--beams", type=_positive_int, default=1, metavar="N",
                     help="beams per sequence (encoder-decoders: slim keeps one encoder output per input)")  # fmt: skip
    sub.add_argument("--dtype", type=_dtype, default="float32", help="cache dtype: fp32 (default), fp16 or bf16")
    sub.add_argument("--plot", metavar="PNG", default=None, help="also plot memory against context length")
    sub.set_defaults(run=cmd_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-slim`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: transcribe, generate, export, verify or memory")
    if getattr(args, "device", "cpu") is None:
        args.device = _default_device()
    if args.command == "generate" and (args.prompt is None) == (args.input is None):
        parser.error("give a PROMPT, or --input PROMPTS.jsonl for a bulk job (not both)")
    if hasattr(args, "batch_size"):
        args.batch_size_given = args.batch_size is not None
        args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    prog = f"hf-slim {args.command}"
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        from .audio import quiet_native_decoders

        with warnings.catch_warnings(), _hf_slim_lines(), quiet_native_decoders():
            warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
            warnings.filterwarnings("ignore", category=FutureWarning)
            return args.run(args)
    except KeyboardInterrupt as interruption:
        _close_bars()
        progress = f": {interruption}" if isinstance(interruption, JobInterrupted) else ""  # how far a bulk job got
        sys.stderr.write(f"{prog}: interrupted{progress}\n")
        return 130
    except Exception as error:  # one line, no traceback (HF_SLIM_DEBUG=1 shows it)
        _close_bars()
        if os.environ.get("HF_SLIM_DEBUG") == "1":
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        if not isinstance(error, (CliError, ValueError, OSError, ImportError)):
            message = f"{type(error).__name__}: {message}"
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
