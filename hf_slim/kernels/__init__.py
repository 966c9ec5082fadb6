"""Fused GPU kernels (Triton) for slim caches.

:func:`slim_decode_attention` computes ``hf_slim.absorbed.absorbed_attention(...)[0]`` with one Triton kernel
(plus a split-combine step); :func:`triton_available` says whether it can run on a device. Without Triton
installed both still import: ``triton_available`` returns False and ``slim_decode_attention`` raises.
"""

from __future__ import annotations

try:
    from .slim_decode import DecodeConfig, choose_config, slim_decode_attention, triton_available
except ImportError as _error:  # triton missing: keep the package importable, fall back to the reference path
    _IMPORT_ERROR = _error
    DecodeConfig = None  # type: ignore[assignment,misc]
    choose_config = None  # type: ignore[assignment]

    def triton_available(device) -> bool:  # noqa: ARG001
        """Triton is not installed: no fused kernels on any device."""
        return False

    def slim_decode_attention(*args, **kwargs):  # noqa: ARG001
        """Unavailable without Triton; use :func:`hf_slim.absorbed.absorbed_attention`."""
        raise RuntimeError(f"slim_decode_attention needs triton ({_IMPORT_ERROR})")


__all__ = ["DecodeConfig", "choose_config", "slim_decode_attention", "triton_available"]
