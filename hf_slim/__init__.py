"""hf_slim: slim attention for Hugging Face transformers models.

``slimify(model)`` makes a multi-head-attention model keep one tensor per token per layer (its attention input, or
its keys) instead of keys and values, and drops the cross-attention cache of encoder-decoder models, without
changing outputs. See README.md.
"""

from ._compat import check_transformers_version

__version__ = "0.1.0"

check_transformers_version()

from .api import SlimFallbackWarning, is_slim, slim_record, slimified, slimify, unslimify  # noqa: E402
from .cache import SlimCache, cache_nbytes  # noqa: E402
from .export import SlimCheckpointError, load_slim  # noqa: E402
from .memory import cache_report  # noqa: E402
from .registry import UnsupportedModelError, supported_model_types  # noqa: E402

__all__ = [
    "SlimCache",
    "SlimCheckpointError",
    "SlimFallbackWarning",
    "UnsupportedModelError",
    "cache_nbytes",
    "cache_report",
    "is_slim",
    "load_slim",
    "slim_record",
    "slimified",
    "slimify",
    "supported_model_types",
    "unslimify",
]
