"""hf_slim: slim attention for Hugging Face transformers models.

``slimify(model)`` makes a multi-head-attention model keep one tensor per token per layer (its attention input, or
its keys) instead of keys and values, and drops the cross-attention cache of encoder-decoder models, without
changing outputs. See README.md.

The public names are imported on first use (PEP 562), so ``import hf_slim`` and the ``hf-slim`` command line start
without importing torch or transformers' modeling code; the installed transformers is checked against the tested
range at import all the same (from its package metadata).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ._compat import check_transformers_version

__version__ = "0.1.0"
#: What ``slimify(model, mode=...)`` accepts (here, not in a submodule: the command line offers them without
#: importing torch).
MODES = ("auto", "input", "k")

check_transformers_version()


def _patches_from_a_source_tree() -> None:
    """Make ``hf_slim.patches`` importable when ``hf_slim`` is imported from a source checkout.

    Why: the patch modules live in the top-level ``patches/`` folder and are installed as ``hf_slim.patches``
    (``pyproject.toml``). A script or snippet run from the repository root imports the source folder ``hf_slim/``
    (the current directory comes first on ``sys.path``), which has no ``patches`` subfolder; without this, a user who
    installed the package and tries the README snippet there gets ``ModuleNotFoundError: hf_slim.patches``.
    """
    if importlib.util.find_spec(f"{__name__}.patches") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "patches"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.patches", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["patches"] = module  # what the import system sets on a parent package


_patches_from_a_source_tree()

#: public name -> the submodule that defines it
_PUBLIC = {
    "SlimFallbackWarning": "calibration",
    "is_slim": "record",
    "slim_record": "record",
    "slimified": "api",
    "slimify": "api",
    "unslimify": "api",
    "SlimCache": "cache",
    "cache_nbytes": "cache",
    "SlimCheckpointError": "checkpoint",
    "load_slim": "load",
    "cache_report": "memory",
    "UnsupportedModelError": "registry",
    "supported_model_types": "registry",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
