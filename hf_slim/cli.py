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
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def _device(name: str) -> str:
    """argparse type for ``--device``: a torch device this machine has (torch would fail later, mid-load)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
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


def _bar(total: int, desc: str, unit: str = "step"):
    """A progress bar on stderr, erased when closed, none when stderr is not a terminal (tqdm's ``disable=None``);
    :func:`main` erases the ones an error interrupted."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)
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
    from .api import SlimFallbackWarning

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

    from .export import CONFIG_KEY, _model_class, load_slim, read_slim_settings

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


@dataclass
class Transcript:
    """One transcription: text, measured cache bytes, and how it was run."""

    text: str
    cache_bytes: int
    windows: int


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
        from .cache import cache_nbytes

        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self.peak = max(self.peak, cache_nbytes(cache))


def transcribe_samples(model, processor, samples) -> Transcript:
    """Greedy transcript of mono 16 kHz ``samples: (n,)`` and the bytes of its decoder cache.

    Up to 30 s: one generate call, cache bytes of the cache it returns (``return_dict_in_generate``). Longer:
    Whisper's sequential long-form generate over 30 s windows (with timestamps, as it requires); the cache bytes are
    the peak over all windows, measured on the cache each forward call returns.
    """
    import torch

    from .cache import cache_nbytes

    extractor = processor.feature_extractor
    long_form = len(samples) > WHISPER_WINDOW_SECONDS * WHISPER_SAMPLING_RATE
    parameter = next(model.parameters())
    with torch.inference_mode():
        if not long_form:
            features = extractor(samples, sampling_rate=WHISPER_SAMPLING_RATE, return_tensors="pt").input_features
            out = model.generate(
                features.to(device=parameter.device, dtype=parameter.dtype), return_dict_in_generate=True
            )
            text = processor.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)[0]
            return Transcript(text.strip(), cache_nbytes(out.past_key_values), 1)
        features = extractor(
            samples, sampling_rate=WHISPER_SAMPLING_RATE, return_tensors="pt", truncation=False, padding="longest",
            return_attention_mask=True,
        )  # fmt: skip
        with _PeakCacheMeter(model) as meter:
            sequences = model.generate(
                features.input_features.to(device=parameter.device, dtype=parameter.dtype),
                attention_mask=features.attention_mask.to(parameter.device),
                return_timestamps=True,
            )
    text = processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)[0]
    windows = -(-features.input_features.shape[-1] // extractor.nb_max_frames)
    return Transcript(text.strip(), meter.peak, windows)


def _read_audio(paths: list[str]) -> list[tuple[Path, object]]:
    from .audio import load_wav

    audio = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            raise CliError(f"{path} is a folder: give the WAV files themselves (e.g. {path / '*.wav'})")
        if not path.is_file():
            raise CliError(f"audio file not found: {path}")
        samples, _ = load_wav(path, WHISPER_SAMPLING_RATE)
        audio.append((path, samples))
    return audio


def cmd_transcribe(args) -> int:
    from .api import unslimify
    from .bundled import sample_audio_path

    audio = _read_audio(args.audio or [str(sample_audio_path())])  # fail on bad input before loading the model
    folder = _model_folder(args.model)
    model_type = _read_config(folder).get("model_type")
    if model_type != "whisper":
        raise CliError(f"transcribe needs a Whisper model; {folder} is {model_type!r} (use hf-slim generate)")
    processor = _whisper_processor(folder)
    model, _ = load_model(str(folder), args.dtype, args.mode, args.device)
    runs = ["slim", "vanilla"] if args.compare else ["slim"]
    results: dict[str, list[Transcript]] = {}
    with _bar(len(runs) * len(audio), "transcribing", unit="file") as bar:
        for run in runs:
            if run == "vanilla":
                unslimify(model)
            results[run] = []
            for _, samples in audio:
                results[run].append(transcribe_samples(model, processor, samples))
                bar.update()
    if not args.compare:
        for (path, _), transcript in zip(audio, results["slim"], strict=True):
            print(f"{path.name}: {transcript.text}" if len(audio) > 1 else transcript.text)
        return 0
    encoder_bytes = _whisper_encoder_bytes(model)
    for index, (path, samples) in enumerate(audio):
        slim, vanilla = results["slim"][index], results["vanilla"][index]
        seconds = len(samples) / WHISPER_SAMPLING_RATE
        windows = f", {slim.windows} windows of 30 s, peak cache per window" if slim.windows > 1 else ""
        ratio = vanilla.cache_bytes / max(slim.cache_bytes, 1)
        ratio_e = (vanilla.cache_bytes + encoder_bytes) / max(slim.cache_bytes + encoder_bytes, 1)
        print(f"{path.name} ({seconds:.1f} s{windows})")
        print(f"  slim:    {slim.text}")
        print(f"  vanilla: {vanilla.text}")
        print(
            f"  cache bytes: slim {slim.cache_bytes} ({_human(slim.cache_bytes)}), vanilla {vanilla.cache_bytes} "
            f"({_human(vanilla.cache_bytes)}), ratio {ratio:.1f}x; counting the encoder output both keep "
            f"({_human(encoder_bytes)}): {ratio_e:.2f}x"
        )
        print(f"  transcripts identical: {'yes' if slim.text == vanilla.text else 'NO'}")
    return 0


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


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int):
    """Greedy continuation of ``prompt``: ``(text, cache_bytes)`` with the bytes of the cache generate returned."""
    import torch

    from .cache import cache_nbytes

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    if inputs["input_ids"].shape[1] == 0:
        raise CliError("the prompt is empty after tokenization")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, return_dict_in_generate=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        settings["pad_token_id"] = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**inputs, **settings, streamer=_token_progress(max_new_tokens, "generating"))
    new_tokens = (
        out.sequences[0] if model.config.is_encoder_decoder else out.sequences[0, inputs["input_ids"].shape[1] :]
    )
    return tokenizer.decode(new_tokens, skip_special_tokens=True), cache_nbytes(out.past_key_values)


def cmd_generate(args) -> int:
    from .api import unslimify

    folder = _model_folder(args.model)
    if _read_config(folder).get("model_type") == "whisper":
        raise CliError(f"{folder} is a Whisper speech model: use hf-slim transcribe")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    _check_supported(config, args.mode)  # before the tokenizer: the clearer error first
    tokenizer = _tokenizer(folder)
    _check_length(config, len(tokenizer(args.prompt)["input_ids"]), args.max_new_tokens)  # before loading weights
    model, _ = load_model(args.model, args.dtype, args.mode, args.device)
    text, slim_bytes = generate_text(model, tokenizer, args.prompt, args.max_new_tokens)
    if not args.compare:
        print(text)
        return 0
    unslimify(model)
    vanilla_text, vanilla_bytes = generate_text(model, tokenizer, args.prompt, args.max_new_tokens)
    print(f"slim:    {text}")
    print(f"vanilla: {vanilla_text}")
    print(
        f"cache bytes: slim {slim_bytes} ({_human(slim_bytes)}), vanilla {vanilla_bytes} ({_human(vanilla_bytes)}), "
        f"ratio {vanilla_bytes / max(slim_bytes, 1):.2f}x"
    )
    print(f"outputs identical: {'yes' if text == vanilla_text else 'NO'}")
    return 0


# ------------------------------------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    from .api import slim_record
    from .export import SIDECAR

    out = Path(args.out)
    source = _model_folder(args.model)
    if out.exists() and out.resolve() == source.resolve():
        raise CliError("--out must be another folder than --model (the weights are read while saving)")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out exists and is not a folder: {out}")
    model, folder = load_model(args.model, args.dtype, args.mode, "cpu")
    with _bar(1, f"saving {out}") as bar:
        model.save_pretrained(out)
        for name in _SIDE_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
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
        from .bundled import sample_audio_path

        ((_, samples),) = _read_audio([args.audio or str(sample_audio_path())])
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
        numbers = calibration.get(name)
        if numbers is None:
            print(f"{name:<34} {layer_mode:<8} {'-':>10} {'-':>5} {'-':>16} {'-':>17} {'-':>16} {'-':>6}")
            continue
        chosen = numbers["k_error"] if layer_mode == "k" else numbers["vanilla_error"]
        # input cache: d per token against 2d for K+V; kv: the model's own K and V
        ratio = numbers["cache_ratio"] if layer_mode == "k" else {"kv": 1.0}.get(layer_mode, 2.0)
        rank = f"{numbers['residual_rank']}{'+s' if numbers.get('key_scale') else ''}"  # +s: the key scale column
        print(
            f"{name:<34} {layer_mode:<8} {numbers['cond_w_k']:>10.3g} {rank:>5} "
            f"{numbers['k_error']:>16.2e} {numbers['vanilla_error']:>17.2e} {chosen:>16.2e} {ratio:>5.2f}x"
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
    import torch
    import transformers
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
    _check_supported(config, None)
    names = raw.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    dtype = _torch_dtype(args.dtype) or torch.float32
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

    sub = add("transcribe", "transcribe audio with a slim Whisper",
              "Transcribe WAV files with a slim Whisper model (30 s windows for longer audio).")  # fmt: skip
    sub.add_argument("audio", nargs="*", metavar="AUDIO", help="WAV files (default: the sample shipped with hf_slim)")
    model_options(sub)
    sub.add_argument("--compare", action="store_true",
                     help="also run the unpatched model; print both transcripts and both cache sizes")  # fmt: skip
    sub.set_defaults(run=cmd_transcribe)

    sub = add("generate", "continue a text prompt with a slim model", "Greedy text generation with a slim model.")
    sub.add_argument("prompt", metavar="PROMPT", help="text to continue (decoder-only) or to transform (T5)")
    model_options(sub, required=True, bundled=False)
    sub.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens to generate (default 32)"
    )
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
    prog = f"hf-slim {args.command}"
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        with warnings.catch_warnings(), _hf_slim_lines():
            warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
            warnings.filterwarnings("ignore", category=FutureWarning)
            return args.run(args)
    except KeyboardInterrupt:
        _close_bars()
        sys.stderr.write(f"{prog}: interrupted\n")
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
