"""Files hf_slim writes get the permissions the user's umask gives, as any file the user writes: the converted
bundled model (:mod:`hf_slim.bundled`) and the command line's outputs and exports."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read where the system tells it (Linux: ``/proc/self/status``), else by setting a
    stricter one for an instant (``os.umask`` only reads by writing; a file another thread creates meanwhile gets
    owner-only permissions, never wider ones)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def give_default_permissions(paths: Iterable[Path]) -> None:
    """Give each of ``paths`` the permissions new files and folders get (0666 / 0777 less the umask).

    Why: writers that create private temporary files and rename them into place (``tempfile.mkdtemp``; safetensors'
    ``save_file``, so transformers' ``save_pretrained``) leave a cached or exported model readable by its owner
    only, where the user's umask would let a shared cache or a colleague read it.
    """
    mask = current_umask()
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
