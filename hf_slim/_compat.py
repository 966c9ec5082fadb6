"""The transformers range hf_slim is tested against, checked once at import.

The patched attention forwards are adapted from a specific transformers release; outside the tested range a
change in its internals would surface as a stack trace deep in a forward (or, worse, as wrong outputs), so importing
hf_slim fails early with one line that says what to install.
"""

from __future__ import annotations

import os

from packaging.version import Version

TESTED_TRANSFORMERS = (Version("5.23.0"), Version("5.24.0"))  # [low, high)


def check_transformers_version() -> None:
    """Raise ImportError if the installed transformers is outside the tested range.

    ``HF_SLIM_SKIP_VERSION_CHECK=1`` turns the error into a warning for people testing a new release.
    """
    import transformers

    installed = Version(transformers.__version__)
    low, high = TESTED_TRANSFORMERS
    if low <= installed < high:
        return
    message = (
        f"hf_slim is tested with transformers>={low},<{high} but transformers {installed} is installed; "
        f'run: pip install "transformers>={low},<{high}"'
    )
    if os.environ.get("HF_SLIM_SKIP_VERSION_CHECK") == "1":
        import warnings

        warnings.warn(message, stacklevel=2)
        return
    raise ImportError(message)
