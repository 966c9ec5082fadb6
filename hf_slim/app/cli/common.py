"""What the ``hf-slim`` commands share: argument types and options, progress bars and notes on stderr, the one-line
error, and loading a checkpoint folder (plain or slim) or its shapes alone.

Heavy imports (torch, transformers, the library's modeling code) happen inside the functions that need them, so
``hf-slim --help`` starts without them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hf_slim import MODES

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

DTYPES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip
WHISPER_SAMPLING_RATE = 16_000
#: inputs per generate() call of a bulk job without --batch-size or --max-memory
DEFAULT_BATCH_SIZE = 8


#: progress bars made by :func:`progress_bar` that may still be drawn (weak: a closed, dropped bar disappears by itself)
_OPEN_BARS: weakref.WeakSet = weakref.WeakSet()


class CliError(Exception):
    """Bad input: reported as one line, exit status 1."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a bulk job, with how far it got ("12 of 40 files done; rerun the same command to resume"),
    which :func:`hf_slim.app.cli.main.main` adds to its "interrupted" line."""


def dtype_option(name: str) -> str:
    """argparse type for ``--dtype``: fp32, fp16 or bf16 (or torch's names) to the torch dtype's name."""
    key = name.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (use fp32, fp16 or bf16)")
    return DTYPES[key]


def positive_int(text: str) -> int:
    """argparse type for counts and lengths: a zero or negative one would give an empty run or negative bytes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def memory_size(text: str) -> int:
    """argparse type for ``--max-memory``: ``8GiB``, ``512MiB``, ``2GB``."""
    from ..budget import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def device_option(name: str) -> str:
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


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a ``--dtype`` value (None: the checkpoint's own)."""
    import torch

    return None if name is None else getattr(torch, name)


def progress_bar(total: float, desc: str, unit: str = "step", **shape) -> tqdm:
    """A progress bar on stderr, erased when closed, none when stderr is not a terminal (tqdm's ``disable=None``);
    :func:`main` erases the ones an error interrupted. ``shape``: tqdm's ``bar_format`` and ``postfix``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None, **shape)
    _OPEN_BARS.add(bar)
    return bar


def close_bars() -> None:
    """Erase the progress bars an error or Ctrl-C left open, so the message after them starts on a clean line."""
    for bar in list(_OPEN_BARS):
        bar.close()  # leave=False: overwrites the bar with blanks and returns to the start of the line
    _OPEN_BARS.clear()


def human(nbytes: float) -> str:
    """``1536 -> '1.5 KiB'``: bytes for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def note(message: str) -> None:
    """``note: message`` on stderr, on its own line above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"note: {message}", file=sys.stderr)  # on its own line, above any progress bar


@contextlib.contextmanager
def _fallback_notes() -> Iterator[None]:
    """Show slimify's K-mode fallbacks as one note each instead of a Python warning."""
    from hf_slim.calibration import SlimFallbackWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SlimFallbackWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, SlimFallbackWarning):
            lines = str(warning.message).splitlines()
            note(f"{lines[0]} ({len(lines) - 1} layers)")


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


def slimify_with_progress(model: torch.nn.Module, mode: str, *, notes: bool = True) -> None:
    """``slimify(model, mode)`` with its calibration bar, its K-mode fallbacks as notes (``notes=False``: silenced,
    and no summary line either: for a calibration whose model is not the one reported)."""
    from hf_slim.api import slimify

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


#: config attributes giving the size of a learned position table, decoder's first (T5's relative positions have none)
_POSITION_LIMITS = ("max_target_positions", "n_positions", "max_position_embeddings")


def position_limit(config) -> tuple[str, int] | None:
    """``(attribute, decoder positions)`` of a model with a learned position table; None without one (T5, and RoPE or
    ALiBi models, whose positions are computed and run past the configured length)."""
    from hf_slim.registry import SUPPORTED

    architecture = SUPPORTED.get(getattr(config, "model_type", None))
    if architecture is not None and architecture.positions in ("rope", "alibi", "relative_bias"):
        return None
    name = next((name for name in _POSITION_LIMITS if isinstance(getattr(config, name, None), int)), None)
    return None if name is None else (name, getattr(config, name))


def model_folder(path: str | None) -> Path:
    """The checkpoint folder: ``path``, or the bundled Whisper tiny.en (converted on first use) when None."""
    if path is None:
        from hf_slim.bundled import whisper_tiny_en_dir

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


def read_checkpoint_config(folder: Path) -> dict:
    """``config.json`` of a checkpoint folder (:func:`hf_slim.checkpoint.read_config`); unreadable: a CliError."""
    from hf_slim.checkpoint import read_config

    try:
        return read_config(folder)
    except (OSError, json.JSONDecodeError) as error:
        raise CliError(f"{folder / 'config.json'}: unreadable ({error})") from error


def check_supported(config, mode: str | None) -> None:
    """Refuse, before any weight is read, a model slimify would refuse (UnsupportedModelError with the reason)."""
    from hf_slim.registry import architecture_for

    architecture_for(config, mode or "auto")  # raises UnsupportedModelError with the reason


def load_model(
    path: str | None, dtype: str, mode: str | None, device: str, *, slim: bool = True
) -> tuple[torch.nn.Module, Path]:
    """Load a checkpoint folder (plain or slim) and return ``(model, folder)``; slimified unless ``slim=False``.

    A slim checkpoint is loaded with :func:`hf_slim.load_slim` (its recorded layer modes) unless ``mode`` asks for
    another mode, in which case its plain weights are slimified again.
    """
    from transformers import AutoConfig

    from hf_slim.checkpoint import model_class
    from hf_slim.export import CONFIG_KEY, read_slim_settings
    from hf_slim.load import load_slim

    folder = model_folder(path)
    raw = read_checkpoint_config(folder)
    if "model_type" not in raw:
        raise CliError(f"{folder / 'config.json'} has no model_type: not a transformers model config")
    check_supported(AutoConfig.from_pretrained(folder), mode)
    weights_dtype = torch_dtype(dtype)
    with progress_bar(2, f"loading {folder.name}") as bar:
        recorded = read_slim_settings(folder)["requested_mode"] if CONFIG_KEY in raw else None
        if slim and recorded is not None and mode in (None, recorded):
            model = load_slim(folder, dtype=weights_dtype).to(device)
            bar.update(2)
        else:
            model = model_class(raw, folder).from_pretrained(folder, dtype=weights_dtype).to(device)
            if CONFIG_KEY in vars(model.config):
                delattr(model.config, CONFIG_KEY)
            bar.update()
            if slim:
                slimify_with_progress(model, mode or recorded or "auto")
            bar.update()
    return model.eval(), folder


def unpatched_batch(slim, vanilla) -> str:
    """``"batch N (R x)"``: the unpatched model's batch in the budget and how many times larger slim's is."""
    vanilla_batch = 0 if vanilla is None else vanilla.batch_size
    ratio = f" ({slim.batch_size / vanilla_batch:.1f}x)" if vanilla_batch else ""
    return f"batch {vanilla_batch}{ratio}"


def whisper_processor(folder: Path):
    """The checkpoint's WhisperProcessor (feature extractor and tokenizer), or a CliError saying it has none."""
    from transformers import WhisperProcessor

    try:
        return WhisperProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise CliError(f"{folder} has no Whisper processor files (preprocessor and tokenizer): {error}") from error


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def tokenizer_of(folder: Path):
    """The checkpoint's tokenizer, or a CliError saying it has no usable tokenizer files."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CliError(f"{folder} has no usable tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CliError(f"{folder} has no usable tokenizer files ({str(error).splitlines()[0]})") from error


def check_length(config, prompt_tokens: int, max_new_tokens: int, prompt: str = "the prompt") -> None:
    """Refuse a prompt (plus new tokens) longer than the model's position table, which fails deep inside generate
    with ``IndexError: index out of range in self``."""
    if config.is_encoder_decoder or position_limit(config) is None:  # Whisper's generate checks its own limit
        return
    name, limit = position_limit(config)
    where = f"this {config.model_type} model has {limit} positions ({name})"
    if prompt_tokens >= limit:
        raise CliError(f"{prompt} is {prompt_tokens} tokens, but {where}: shorten it to fewer than {limit} tokens")
    if prompt_tokens + max_new_tokens > limit:
        raise CliError(
            f"{prompt} ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} needs "
            f"{prompt_tokens + max_new_tokens} positions, but {where}: use --max-new-tokens {limit - prompt_tokens} "
            "or less, or a shorter prompt"
        )


def meta_model_of(folder: Path, dtype: str | None) -> torch.nn.Module:
    """The checkpoint's model on the meta device: shapes for planning without reading weights."""
    from transformers import AutoConfig

    raw = read_checkpoint_config(folder)  # first: an unreadable config.json is the command line's one-line error
    return meta_from_config(AutoConfig.from_pretrained(folder), raw, dtype, folder)


def meta_from_config(config, raw: dict, dtype_name: str | None, source: str | Path) -> torch.nn.Module:
    """The model ``config`` describes (``raw``: its config.json, read from ``source``) on the meta device: the class
    ``architectures`` names, or ``AutoModel`` when it names none or a class transformers does not have."""
    import torch
    import transformers

    from hf_slim.checkpoint import SlimCheckpointError, model_class

    check_supported(config, None)
    try:
        found = model_class(raw, source)
    except SlimCheckpointError:  # a name transformers lacks: the base model of the config, as AutoModel builds it
        found = transformers.AutoModel
    dtype = torch_dtype(dtype_name) or torch.float32
    with torch.device("meta"):  # the class's public constructor; floating-point weights then cast (no data moves)
        model = transformers.AutoModel.from_config(config) if found is transformers.AutoModel else found(config)
    return model.to(dtype)


def add_command(
    commands: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A sub-command's parser, with its one-line help and its description."""
    return commands.add_parser(name, help=help, description=description)


def add_model_options(sub: argparse.ArgumentParser, *, required: bool = False, bundled: bool = True) -> None:
    """--model, --dtype, --mode and --device (``bundled``: --model defaults to the bundled Whisper tiny.en)."""
    default = " (default: the bundled Whisper tiny.en)" if bundled and not required else ""
    sub.add_argument("--model", metavar="DIR", required=required, help=f"checkpoint folder{default}")
    sub.add_argument("--dtype", type=dtype_option, default="float32", help="fp32 (default), fp16 or bf16")
    sub.add_argument("--mode", choices=MODES, default=None,
                     help="slim mode (default: the checkpoint's recorded mode, else auto)")  # fmt: skip
    sub.add_argument("--device", type=device_option, default=None,
                     help="torch device (default: cuda if available, else cpu)")  # fmt: skip


def add_bulk_options(sub: argparse.ArgumentParser, *, unit: str) -> None:
    """The options of a bulk job (transcribe, generate --input): batch size or memory budget, beams, resume, Ray."""
    size = sub.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                      help=f"{unit} per generate() call (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    size.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                      help="pick the largest batch whose slim cache, encoder output and activations fit SIZE "
                      "(e.g. 8GiB; estimated from the model and the longest input), and print the batch the "
                      "unpatched model would get")  # fmt: skip
    sub.add_argument("--num-beams", type=positive_int, default=1, metavar="N", help="beam search width (default 1)")
    sub.add_argument("--overwrite", action="store_true",
                     help="redo inputs whose output exists (default: skip them: a run resumes)")  # fmt: skip
    sub.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help='run as a Ray Data pipeline, one slim model per actor: on a local Ray started for '
                     'the job, or on the cluster at ADDRESS (pip install "hf-slim[ray]")')  # fmt: skip
    sub.add_argument("--workers", type=positive_int, default=2, metavar="N",
                     help="Ray actors, each with its own model (default 2)")  # fmt: skip
