"""What a patched attention module knows about itself (``module.hf_slim``): mode, head layout, live projections.

Also the checks that keep a K-mode layer's derived buffers (``W_KV``) tied to the weights they were solved from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .adapters import holds_adapter_layers
from .cache_layers import SlimLayout
from .kmode import KSourceStamp, solve_k_mode
from .projections import Projections
from .rope import RotaryLayout, RotarySource

if TYPE_CHECKING:
    from .sites import AttentionRoute


@dataclass
class SlimAttentionState:
    """What a patched attention module needs to know about itself.

    Attributes
    ----------
    mode:
        ``"input"`` (cache X), ``"k"`` (cache K), or ``"encoder"`` (cross-attention over the encoder output).
    layer_idx:
        index of this layer's slot in the slim cache.
    num_heads, head_dim:
        head layout of the projections.
    projections:
        returns the module's live :class:`Projections`.
    calibration:
        per-layer numbers measured when the mode was chosen (K mode relative errors), for reports and export.
    name:
        the site's name, for error messages.
    layout:
        what this layer writes into a slim cache (:class:`~hf_slim.cache_layers.SlimLayout`: its model and mode), so a
        cache filled by another model or mode is refused.
    k_source:
        for K-mode layers, the :class:`~hf_slim.kmode.KSourceStamp` of the weights ``W_KV`` was derived from,
        checked at every step.
    residual_rank:
        K mode only: ``r``, the input directions cached beside the keys (:mod:`hf_slim.kmode`). The cached tensor
        is ``C = [K | Z]``, ``(batch, seq, e + r)``: scores read the first ``e`` columns (head ``i`` its slice of
        K), the weighted sum reads all ``e + r``, then each head applies its slice of the stacked projection
        ``module.hf_slim_w_kv: (e + r, e)``. ``0`` is the plain K cache.
    rotary:
        the RoPE layout of a K-mode layer whose keys are cached rotated (:mod:`hf_slim.rope`), else None.
    rotary_source:
        how such a layer's cos/sin are recomputed from positions (the model's rotary module or GPT-J's sinusoid
        buffer), or None: its cache then keeps the cos/sin table.
    route:
        how a routed layer's own forward is served (:class:`~hf_slim.sites.AttentionRoute`), or None for a
        layer with a replacement forward.
    key_scale:
        K mode only: the model normalises its keys per token (:class:`~hf_slim.projections.KeyNorm`), so the cache
        keeps one more column after ``[K | Z]``, each token's key scale ``s``: ``C = [K | Z | s]``, ``(batch, seq,
        e + r + 1)``. The values are rebuilt from ``[s * K | Z]`` (:func:`~hf_slim.slim_tensor.scale_keys`; the keys
        un-rotated first for RoPE), with ``diag(1/w)`` folded into ``W_KV``; Z is not scaled.
    """

    mode: str
    layer_idx: int
    num_heads: int
    head_dim: int
    projections: Callable[[], Projections]
    calibration: dict = field(default_factory=dict)
    name: str = ""
    layout: SlimLayout | None = None
    k_source: KSourceStamp | None = None
    residual_rank: int = 0
    rotary: RotaryLayout | None = None
    rotary_source: RotarySource | None = None
    key_scale: bool = False
    route: AttentionRoute | None = None
    _projection_cache: tuple | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Copies and pickles start without the cached read (it holds views of this instance's weights)."""
        return {**self.__dict__, "_projection_cache": None}

    def live_projections(self, module: torch.nn.Module) -> Projections:
        """The layer's projections now; for a K-mode layer, after the O(1) check that ``W_KV`` still fits them
        (:meth:`KSourceStamp.check`).

        Inside a ``torch.compile`` trace the O(1) check is left out (version counters and data pointers cannot be
        traced); the full check (:meth:`verify_derived`) runs eagerly before every ``generate()`` and at the first
        forward on every new slim cache, outside any compiled region.
        """
        projections = self.current_projections(module)
        if self.k_source is not None and not torch.compiler.is_compiling():
            rederive = functools.partial(self._rederive, module, projections)
            self.k_source.check(projections, self.derived_buffers(module), self.name, rederive)
        return projections

    def current_projections(self, module: torch.nn.Module) -> Projections:
        """:attr:`projections`, read again only when the layer's state may have changed since the last read.

        Why: reading them (PEFT detection, dequantization rules, weight views) costs more host time than the rest of
        a decode step's bookkeeping, at every step of every layer. The last read is reused while the layer holds
        the same submodules (a PEFT wrapper or a quantized layer swapped in replaces one) and its weights the same
        storage (``.data = ...``, a cast or a device move changes it; in-place edits reach the views the read holds,
        and the K-mode stamp's version counters see them). Layers with PEFT adapter layers (enabled or not) or
        quantized projections are read at every step: their state lives in flags and codes these keys do not cover.
        """
        cached = self._projection_cache
        if cached is not None and not torch.compiler.is_compiling():
            key, projections = cached
            if key == _layer_state_key(module, projections):
                return projections
        projections = self.projections()
        plain = projections.quantized is None and not holds_adapter_layers(module)
        self._projection_cache = (_layer_state_key(module, projections), projections) if plain else None
        return projections

    def derived_buffers(self, module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """A K-mode layer's buffers derived from its weights: ``W_KV (e + r, e)``, the value offset ``(e,)`` and, for
        ``r > 0``, ``z_proj (d, r)`` (see :mod:`hf_slim.kmode`)."""
        names = ("hf_slim_w_kv", "hf_slim_v_offset") + (("hf_slim_z_proj",) if self.residual_rank else ())
        return tuple(module._buffers[name] for name in names)

    @torch.compiler.disable
    def verify_derived(self, module: torch.nn.Module) -> None:
        """The full check of a K-mode layer (:meth:`KSourceStamp.verify`: one read of W_K, W_V and the derived
        buffers), eager even when called from compiled code; a no-op for other layers."""
        if self.k_source is None:
            return
        projections = self.projections()
        rederive = functools.partial(self._rederive, module, projections)
        self.k_source.verify(projections, self.derived_buffers(module), self.name, rederive)

    @torch.no_grad()
    def _rederive(self, module: torch.nn.Module, projections: Projections) -> None:
        """Solve the derived buffers again from the live (already checked) weights, in place, at this layer's
        residual rank (the float64 SVD of W_K: as long as slimify's solve of one layer)."""

        weights = solve_k_mode(projections, self.residual_rank)
        values = (weights.w_kv, weights.v_offset) + ((weights.z_proj,) if self.residual_rank else ())
        for buffer, value in zip(self.derived_buffers(module), values, strict=True):
            buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))


def _layer_state_key(module: torch.nn.Module, projections: Projections) -> tuple:
    """What a cached read of a layer's projections depends on: the identity of the module's submodules (all levels)
    and the storage of the tensors the read came from (:meth:`SlimAttentionState.current_projections`)."""
    sources = projections.sources or (projections.w_k, projections.w_v, projections.b_k, projections.b_v)
    return (
        tuple(id(sub) for sub in module.modules()),
        tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in sources if t is not None),
    )
