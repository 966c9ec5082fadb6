"""``hf-slim export``: load a checkpoint, slimify it and save it as a slim checkpoint with the files that make the
folder usable on its own (tokenizer, processor)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .common import CliError, add_command, add_model_options, load_model, model_folder, progress_bar

#: files next to the weights that export copies so the exported folder is usable on its own
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "spiece.model", "normalizer.json", "preprocessor_config.json", "processor_config.json",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def _identity(path: Path) -> tuple[int, int]:
    """``(inode, modification time)``: changes when a file is written or replaced."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def run(args: argparse.Namespace) -> int:
    """Run ``hf-slim export`` with its parsed arguments; returns the exit status."""
    from hf_slim.api import slim_record
    from hf_slim.export import SIDECAR
    from hf_slim.files import give_default_permissions
    from hf_slim.memory import slim_summary

    out = Path(args.out)
    source = model_folder(args.model)
    if out.exists() and out.resolve() == source.resolve():
        raise CliError("--out must be another folder than --model (the weights are read while saving)")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out exists and is not a folder: {out}")
    model, folder = load_model(args.model, args.dtype, args.mode, "cpu")
    before = {path: _identity(path) for path in out.iterdir()} if out.is_dir() else {}
    with progress_bar(1, f"saving {out}") as bar:
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
    print(f"exported slim checkpoint to {out} (mode {record.requested_mode}; {slim_summary(model, brief=True)})")
    if (out / SIDECAR).is_file():
        print(f"K-mode weights in {out / SIDECAR}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``export`` sub-command and its options."""
    sub = add_command(commands, "export", "save a slim checkpoint",
              "Load, slimify and save a checkpoint with its slim settings (hf_slim.load_slim reloads it).")  # fmt: skip
    add_model_options(sub)
    sub.add_argument("--out", metavar="DIR", required=True, help="output folder")
    sub.set_defaults(run=run)
