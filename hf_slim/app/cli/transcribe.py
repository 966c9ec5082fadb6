"""``hf-slim transcribe``: audio files through a slim Whisper in batches, to the terminal or to txt/srt/vtt/json
files, resumable; ``--compare`` runs the unpatched model beside it; ``--ray`` runs it as a Ray Data pipeline."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..outputs import FORMATS
from .common import (
    WHISPER_SAMPLING_RATE,
    CliError,
    JobInterrupted,
    add_bulk_options,
    add_command,
    add_model_options,
    human,
    load_model,
    meta_model_of,
    model_folder,
    note,
    positive_int,
    progress_bar,
    read_checkpoint_config,
    unpatched_batch,
    whisper_processor,
)

#: Whisper windows are 30 s; longer audio is transcribed window by window (sequential long-form generate).
WHISPER_WINDOW_SECONDS = 30.0


def _temperatures(text: str) -> tuple[float, ...]:
    """argparse type for ``--temperature``: ``0``, ``0.7`` or a fallback list ``0,0.2,0.4,0.6,0.8,1.0``."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (0,0.2,0.4), got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"temperatures must be 0 or more, got {text!r}")
    return values


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
        from hf_slim._compat import returned_cache
        from hf_slim.cache import cache_nbytes

        cache = returned_cache(output)
        if cache is not None:
            self.peak = max(self.peak, cache_nbytes(cache))


def _report_failure(prog: str) -> callable:
    """One line per bad input, written above the progress bar (which goes on: the job does)."""

    def report(path: Path, reason: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"{prog}: error: {reason}", file=sys.stderr)  # the reason names the file

    return report


def _whisper_budget(model, args, *, slim: bool, budget: int | None = None, batch_size: int | None = None):
    """:func:`hf_slim.app.budget.largest_batch` (``budget``) or :func:`hf_slim.app.budget.batch_memory` (``batch_size``)
    for 30 s Whisper windows: 1500 encoder frames, the decoder up to the generation limit (448 positions)."""
    from ..budget import batch_memory, largest_batch

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
            f"--max-memory {human(args.max_memory)} is too small for one 30 s window of this model: it needs about "
            f"{human(one.peak)} (cache, encoder output and activations, estimated)"
        )
    vanilla = _whisper_budget(model, args, slim=False, budget=args.max_memory)
    note(
        f"--max-memory {human(args.max_memory)}: batch {slim.batch_size} of 30 s windows, {args.num_beams} "
        f"beam(s) each (slim cache, encoder output and activations, estimated: {human(slim.peak)}); the unpatched "
        f"model would get {unpatched_batch(slim, vanilla)} in the same budget"
    )
    if files < slim.batch_size:
        note(f"using batch {files}: there are {files} files to transcribe")
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
        postfix = f"0/{self.total_files} files"
        self.bar = progress_bar(seconds, desc, " s audio", bar_format=self.FORMAT, postfix=postfix)

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
    """The :class:`hf_slim.app.transcription.WhisperOptions` of the command line. Several temperatures without
    thresholds get transformers' documented fallback thresholds (compression ratio 1.35, over token bytes, and
    log-probability -1.0): without a threshold no window would ever fall back."""
    from ..transcription import WhisperOptions

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

    from ..transcription import check_options

    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError as error:
        raise CliError(f"{folder} has no generation_config.json, which Whisper's generate needs ({error})") from error
    check_options(generation_config, options)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-slim transcribe`` with its parsed arguments; returns the exit status."""
    from ..bulk import JobReport, check_audio, plan_audio_job

    prog = "hf-slim transcribe"
    if args.format != "txt" and args.output_dir is None:
        raise CliError(f"--format {args.format} writes files: give --output-dir DIR")
    if args.ray is not None and args.compare:
        raise CliError("--compare runs in one process: leave out --ray")
    if args.audio:
        arguments = args.audio
    else:
        from hf_slim.bundled import sample_audio_path

        arguments = [str(sample_audio_path())]
    output_dir = Path(args.output_dir) if args.output_dir else None
    tasks, skipped = plan_audio_job(arguments, output_dir, args.format, resume=not args.overwrite)
    folder = model_folder(args.model)
    model_type = read_checkpoint_config(folder).get("model_type")
    if model_type != "whisper":
        raise CliError(f"transcribe needs a Whisper model; {folder} is {model_type!r} (use hf-slim generate)")
    options = _whisper_options(args)
    _check_whisper_options(folder, options)
    report = JobReport(skipped=skipped)
    inputs = len(tasks) + skipped
    if skipped:
        note(f"skipping {skipped} file(s) whose {args.format} output exists (--overwrite redoes them)")
    tasks = check_audio(tasks, report, _report_failure(prog))  # bad files are reported before the model loads
    if not tasks:
        return _transcribe_summary(args, report, output_dir)
    try:
        if args.ray is not None:
            return _transcribe_on_ray(args, options, tasks, report, output_dir, folder)
        processor = whisper_processor(folder)
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
    """The job in this process: batches through :func:`hf_slim.app.bulk.transcribe_tasks`, the transcripts printed as
    each batch finishes when there is no output folder."""
    from ..bulk import transcribe_tasks

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
    from ..raydata import transcribe_tasks_on_ray

    model = meta_model_of(folder, args.dtype)  # shapes for the batch plan; each actor loads the real weights
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

    from hf_slim.api import unslimify

    from ..bulk import batches, decode_batch
    from ..outputs import render, write_atomic
    from ..transcription import transcribe_batch

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
    with progress_bar(2 * sum(len(batch) for batch in planned), "transcribing", unit="file") as bar:
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
                f"  cache bytes{rows}: slim {slim_bytes} ({human(slim_bytes)}), vanilla {vanilla_bytes} "
                f"({human(vanilla_bytes)}), ratio {ratio:.1f}x; counting the encoder output both keep "
                f"({human(encoder)}): {ratio_e:.2f}x"
            )
            print(f"  transcripts identical: {'yes' if same else 'NO'}")  # token ids, text, segments, words
            if task.output is not None:
                write_atomic(task.output, render(slim, args.format, source=str(task.path)))
            report.results[task.path] = slim
            report.done += 1
    if len(report.results) > 1:
        print(f"identical transcripts (token ids, text, timings): {identical} of {len(report.results)} files")
    return _transcribe_summary(args, report, Path(args.output_dir) if args.output_dir else None)


def load_whisper(model: str | None, dtype: str, mode: str | None, device: str) -> tuple:
    """``(slim Whisper, its processor)`` for a bulk worker (Ray ships this function to its actors by name)."""
    loaded, folder = load_model(model, dtype, mode, device)
    return loaded, whisper_processor(folder)


def _whisper_encoder_bytes(model, batch: int = 1) -> int:
    config = model.config
    return batch * config.max_source_positions * config.d_model * next(model.parameters()).element_size()


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``transcribe`` sub-command and its options."""
    sub = add_command(commands, "transcribe", "transcribe audio files with a slim Whisper",
              "Transcribe audio files (WAV, FLAC, MP3, OGG; M4A with PyAV) with a slim Whisper model, in batches "
              "(30 s windows; longer files window by window), to the terminal or to txt/srt/vtt/json "
              "files.")  # fmt: skip
    sub.add_argument("audio", nargs="*", metavar="PATH",
                     help="audio files, folders (searched recursively) or glob patterns (default: the sample shipped "
                     "with hf_slim)")  # fmt: skip
    add_model_options(sub)
    add_bulk_options(sub, unit="files")
    sub.add_argument("--output-dir", metavar="DIR", default=None,
                     help="write one output per input file here (default: print the transcripts)")  # fmt: skip
    sub.add_argument("--format", choices=FORMATS, default="txt",
                     help="output format with --output-dir: txt (default), srt, vtt or json (text, timestamped "
                     "segments, language, token ids)")  # fmt: skip
    sub.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                     help="tokens per 30 s window (default: the model's limit, 448 positions)")  # fmt: skip
    _add_whisper_options(sub)
    sub.add_argument("--compare", action="store_true",
                     help="also run the unpatched model; print both transcripts and both cache sizes")  # fmt: skip
    sub.set_defaults(run=run)


def _add_whisper_options(sub: argparse.ArgumentParser) -> None:
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
