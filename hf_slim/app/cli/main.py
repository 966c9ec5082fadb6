"""The ``hf-slim`` console script: the argument parser of every command, and the run that turns bad input into one
line ``hf-slim <command>: error: ...`` and no traceback (``HF_SLIM_DEBUG=1`` shows the traceback instead)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from . import export, generate, memory, transcribe, verify
from .common import DEFAULT_BATCH_SIZE, CliError, JobInterrupted, close_bars


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block first)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``hf-slim`` and its commands, each command's options from its module."""
    parser = _Parser(prog="hf-slim", description="Slim attention for Hugging Face transformers models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (transcribe, generate, export, verify, memory):
        command.add_parser(commands)
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
        from ..audio import quiet_native_decoders

        with warnings.catch_warnings(), _hf_slim_lines(), quiet_native_decoders():
            warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
            warnings.filterwarnings("ignore", category=FutureWarning)
            return args.run(args)
    except KeyboardInterrupt as interruption:
        close_bars()
        progress = f": {interruption}" if isinstance(interruption, JobInterrupted) else ""  # how far a bulk job got
        sys.stderr.write(f"{prog}: interrupted{progress}\n")
        return 130
    except Exception as error:  # one line, no traceback (HF_SLIM_DEBUG=1 shows it)
        close_bars()
        if os.environ.get("HF_SLIM_DEBUG") == "1":
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        if not isinstance(error, (CliError, ValueError, OSError, ImportError)):
            message = f"{type(error).__name__}: {message}"
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 1
