"""Checkpoint folders as hf_slim reads them: ``config.json`` read in one place, and the transformers class its
``architectures`` names chosen in one place, for slim checkpoints (:mod:`hf_slim.export`, :mod:`hf_slim.load`) and
the command line alike. Importing it imports neither torch nor transformers (``hf-slim --help`` stays fast)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


class SlimCheckpointError(ValueError):
    """A slim checkpoint is missing, damaged, from an incompatible hf_slim version, or does not fit its weights."""


def read_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint folder (or the config file itself, when ``path`` is a file).

    Why one function: the checkpoint's settings, its model type and its architecture are all read from this file by
    the library and the command line; each caller words its own error for its user (a ``SlimCheckpointError``, a
    one-line command-line error), so the reading raises the plain errors.

    Raises
    ------
    OSError
        The file is missing or unreadable.
    json.JSONDecodeError
        The file is not JSON (a ``ValueError``).
    """
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    return json.loads(config_file.read_text(encoding="utf-8"))


def model_class(config: Mapping, source: str | os.PathLike) -> type:
    """The transformers class named by ``config["architectures"][0]``; ``AutoModel`` when it names none.

    Why: a checkpoint is loaded (``from_pretrained``) or built (on the meta device) with the class it was saved from,
    so its head (``...ForConditionalGeneration``, ``...ForCausalLM``) comes with it.

    Parameters
    ----------
    config : Mapping
        A parsed ``config.json`` (:func:`read_config`).
    source : str or os.PathLike
        The checkpoint folder (or config file) the config came from, named in the error.

    Raises
    ------
    SlimCheckpointError
        ``architectures[0]`` is a name transformers does not have: :func:`hf_slim.load_slim` refuses such a
        checkpoint; the command line's ``memory`` and bulk planning catch it and build ``AutoModel`` instead.
    """
    import transformers

    architectures = config.get("architectures") or []
    if not architectures:
        return transformers.AutoModel
    found = getattr(transformers, architectures[0], None)
    if found is None:
        raise SlimCheckpointError(
            f"{source}: config.json names architecture {architectures[0]!r}, unknown to transformers"
        )
    return found
