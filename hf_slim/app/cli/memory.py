"""``hf-slim memory``: vanilla and slim cache bytes per layer from a config alone (the model built on the meta
device), optionally plotted against the context length."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    CliError,
    add_command,
    dtype_option,
    meta_from_config,
    meta_model_of,
    model_folder,
    note,
    position_limit,
    positive_int,
)


def _meta_model(args):
    """The model of ``--model`` or ``--config``, built on the meta device (no weights are read or allocated)."""
    from transformers import AutoConfig

    from hf_slim.checkpoint import read_config

    if args.config is not None:
        path = Path(args.config)
        if path.is_dir():
            raise CliError(f"--config takes a config.json file; {path} is a folder (use --model {path})")
        if not path.is_file():
            raise CliError(f"config file not found: {path}")
        try:
            raw = read_config(path)
        except (OSError, json.JSONDecodeError) as error:
            raise CliError(f"{path}: not a JSON config ({error})") from error
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise CliError(f"{path}: a transformers config.json with a model_type is needed")
        try:
            config = AutoConfig.for_model(**raw)
        except (ValueError, KeyError) as error:
            raise CliError(f"{path}: {str(error).splitlines()[0]}") from error
        return meta_from_config(config, raw, args.dtype, path)
    return meta_model_of(model_folder(args.model), args.dtype)


def _default_seq_len(config) -> int:
    limit = position_limit(config)
    return 512 if limit is None else limit[1]


def run(args: argparse.Namespace) -> int:
    """Run ``hf-slim memory`` with its parsed arguments; returns the exit status."""
    from hf_slim.memory import cache_report

    if args.plot:
        _check_plot_target(Path(args.plot))  # before any work: the table would be printed, then the plot fail
    model = _meta_model(args)
    if args.encoder_len is not None and not model.config.is_encoder_decoder:
        raise CliError(f"--encoder-len is for encoder-decoder models (Whisper, T5); {model.config.model_type} has none")
    seq_len = _default_seq_len(model.config) if args.seq_len is None else args.seq_len
    limit = position_limit(model.config)
    if limit is not None and seq_len > limit[1]:
        note(f"{model.config.model_type} has {limit[1]} positions ({limit[0]}): it cannot run {seq_len} tokens")
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

    from hf_slim.memory import cache_report

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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``memory`` sub-command and its options."""
    sub = add_command(commands, "memory", "cache memory report, vanilla vs slim",
              "Vanilla and slim cache bytes per layer, from the config alone (meta device).")  # fmt: skip
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="checkpoint folder (only config.json is read)")
    source.add_argument("--config", metavar="JSON", help="a config.json file")
    sub.add_argument(
        "--seq-len", type=positive_int, default=None, metavar="N", help="decoder tokens (default: model maximum)"
    )
    sub.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size (default 1)")
    sub.add_argument("--encoder-len", type=positive_int, default=None, metavar="N",
                     help="encoder frames/tokens (encoder-decoders; default: Whisper 1500, else seq-len)")  # fmt: skip
    sub.add_argument("--beams", type=positive_int, default=1, metavar="N",
                     help="beams per sequence (encoder-decoders: slim keeps one encoder output per input)")  # fmt: skip
    sub.add_argument("--dtype", type=dtype_option, default="float32", help="cache dtype: fp32 (default), fp16 or bf16")
    sub.add_argument("--plot", metavar="PNG", default=None, help="also plot memory against context length")
    sub.set_defaults(run=run)
