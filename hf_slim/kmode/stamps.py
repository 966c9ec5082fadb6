"""The stamp that ties a K-mode layer's derived buffers (W_KV, the value offset, z_proj) to the weights, dtype and
storage they were derived from, checked per step (O(1)) and per generate() (one read)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..projections import Projections


class StaleKModeWeights(RuntimeError):
    """The weights or the dtype of a K-mode layer changed after slimify, so its ``W_KV`` no longer rebuilds V."""


#: Elements of a weight converted to float64 at a time when sketching it (bounds the temporary copy at 16 MiB).
_SKETCH_BLOCK = 1 << 21


@functools.lru_cache(maxsize=64)
def _probe(columns: int, device: torch.device, absolute: bool) -> torch.Tensor:
    """The fixed sketch probe ``cos(0.785 j + 0.1)`` (no zero entries), float64 ``(columns,)``, made once per size."""
    probe = torch.cos(torch.arange(columns, dtype=torch.float64, device=device) * 0.7853981 + 0.1)
    return probe.abs() if absolute else probe


@dataclass(frozen=True)
class Sketch:
    """A float64 fingerprint of one tensor, on the CPU: ``values = rows @ probe`` and the bound ``|rows| @ |probe|``
    (one number per row of a matrix, one per element of a vector), with a fixed probe.

    Why a sketch and not a copy: it costs one read of the tensor and a few bytes per row, yet any change of the values
    larger than rounding moves it (the probe has no zero entries and no structure a weight edit would follow), and it
    is the same on every device. ``bound``, computed once at stamp time, scales the tolerance of each row
    (:meth:`matches`); a check computes only the values.
    """

    values: torch.Tensor
    bound: torch.Tensor

    @staticmethod
    def _rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().reshape(-1, tensor.shape[-1] if tensor.dim() > 1 else 1)  # vectors: one row each

    @staticmethod
    def _apply(rows: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """``rows @ probe`` (or ``|rows| @ |probe|``) in float64, converting ``_SKETCH_BLOCK`` elements at a time."""
        columns = rows.shape[-1]
        probe = _probe(columns, rows.device, absolute)  # (cols,)
        out = []
        for block in rows.split(max(1, _SKETCH_BLOCK // columns)):  # (rows_b, cols)
            block = block.to(torch.float64)
            out.append(torch.mv(block.abs() if absolute else block, probe))
        return torch.cat(out).cpu()

    @classmethod
    def of(cls, tensor: torch.Tensor | None) -> Sketch | None:
        if tensor is None:
            return None
        rows = cls._rows(tensor)
        return cls(cls._apply(rows), cls._apply(rows, absolute=True))

    def matches(self, tensor: torch.Tensor | None, rtol: float) -> bool:
        """Whether ``tensor`` holds the sketched values up to ``rtol`` of each row's magnitude (NaN never matches)."""
        if tensor is None:
            return False
        rows = self._rows(tensor)
        if rows.shape[0] != self.values.shape[0]:
            return False
        return bool(((self._apply(rows) - self.values).abs() <= rtol * self.bound + 1e-300).all())


def _same(old: Sketch | None, tensor: torch.Tensor | None, rtol: float) -> bool:
    return (old is None and tensor is None) or (old is not None and old.matches(tensor, rtol))


#: Weights are compared as float64 values: a sketch of identical values differs only by the float64 summation order
#: of the device that computed it.
_WEIGHT_RTOL = 1e-12


def _derived_rtol(dtype: torch.dtype) -> float:
    """Derived buffers (``W_KV`` in the model dtype) solved again from the same weights may round differently by one
    unit in the last place where the float64 solve's last bits differ (other BLAS threads): 4 of them per row."""
    return 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _versions(projections: Projections, buffers: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], ...]:
    """``(version counter, data pointer)`` of each tensor the layer's K mode depends on: the projections' source
    tensors and the derived buffers themselves. In-place edits bump the first, ``.data = ...`` assignments, device
    moves and ``to_empty`` change the second; edits through ``param.data`` in place change neither (the per-generate
    check, :meth:`KSourceStamp.verify`, reads the values)."""
    parts = (*(projections.sources or _stamped(projections)), *buffers)
    return tuple((-1, 0) if t is None else (t._version, t.data_ptr()) for t in parts)


def _stamped(projections: Projections) -> tuple[torch.Tensor | None, ...]:
    """The tensors ``W_KV`` is derived from: W_K, W_V, their biases and a key norm's weight (folded in as 1/w)."""
    key_weight = None if projections.key_norm is None else projections.key_norm.weight
    return (projections.w_k, projections.w_v, projections.b_k, projections.b_v, key_weight)


@dataclass
class KSourceStamp:
    """Which weights, dtype and derived buffers a K-mode layer runs with, checked before its K cache is used.

    Why: ``W_KV = W_K^-1 W_V`` (and the value offset, and ``z_proj = U_r``) are copies derived from the weights, kept
    as non-persistent buffers. ``load_state_dict``, an optimizer step or any edit changes W_K/W_V but not W_KV (decode
    would silently use the old weights); ``to_empty()`` after a move through the meta device fills the buffers with
    uninitialised memory while ``load_state_dict`` restores the weights (they are not in the state dict); a dtype cast
    breaks the calibration's promise (the K cache is exact only in the dtype it was calibrated in).

    Two checks, both eager (never inside a ``torch.compile`` trace):

    * :meth:`verify`, one read of W_K, W_V and the buffers (float64 :class:`Sketch` es), at every ``generate()`` call
      and at the first forward on every new slim cache: weights that changed raise :class:`StaleKModeWeights`;
      buffers that no longer match identical weights (``to_empty``) are solved again from the weights and checked.
      It sees every kind of edit, ``param.data`` in place and compiled forwards included.
    * :meth:`check`, O(1) at every eager decode step: dtype, LoRA adapters, and the version counters and data pointers
      of the weights and buffers; when one of them moved, :meth:`verify` runs.
    """

    dtype: torch.dtype
    versions: tuple[tuple[int, int], ...]
    sketches: tuple[Sketch | None, ...]
    derived: tuple[Sketch, ...]

    @classmethod
    def of(cls, projections: Projections, buffers: tuple[torch.Tensor, ...]) -> KSourceStamp:
        """Stamp the live projections and the derived ``buffers`` (``W_KV``, offset[, ``z_proj``]) as installed."""
        return cls(
            projections.w_k.dtype,
            _versions(projections, buffers),
            tuple(Sketch.of(t) for t in _stamped(projections)),
            tuple(Sketch.of(t) for t in buffers),
        )

    def _check_kind(self, projections: Projections, where: str) -> None:
        if projections.w_k.dtype != self.dtype:
            raise StaleKModeWeights(
                f"{where} uses the K cache, set up for {self.dtype}, but the model now runs in {projections.w_k.dtype}:"
                " the K cache is only known to be exact in the dtype it was calibrated in. Call "
                "hf_slim.unslimify(model) and hf_slim.slimify(model, mode='k') after the cast to calibrate again (or, "
                "without RoPE, use mode='input': exact in every dtype)"
            )
        if projections.k_low_rank or projections.v_low_rank:
            raise StaleKModeWeights(
                f"{where} uses the K cache but its key/value projections now carry LoRA adapters, which change W_K and "
                "W_V; merge them (peft: model.merge_and_unload()) and slimify again (or, without RoPE, use "
                "mode='input', which serves active adapters exactly)"
            )

    def check(
        self, projections: Projections, buffers: tuple[torch.Tensor, ...], where: str, rederive: Callable[[], None]
    ) -> None:
        """The per-step O(1) check; runs :meth:`verify` when a version counter or data pointer moved (of the buffers
        only when theirs moved: accelerate's offload hooks give the weights new storage at every step)."""
        self._check_kind(projections, where)
        versions = _versions(projections, buffers)
        if versions != self.versions:
            moved = versions[-len(buffers) :] != self.versions[-len(buffers) :]
            self.verify(projections, buffers, where, rederive, buffers_too=moved)

    def verify(
        self,
        projections: Projections,
        buffers: tuple[torch.Tensor, ...],
        where: str,
        rederive: Callable[[], None],
        *,
        buffers_too: bool = True,
    ) -> None:
        """Raise :class:`StaleKModeWeights` unless ``projections`` hold the stamped weights (values and dtype); call
        ``rederive()`` (solve the buffers again in place from the live weights) if the buffers no longer hold what was
        derived from them, and raise if they still do not. Costs one read of W_K, W_V and (``buffers_too``) the
        buffers."""
        self._check_kind(projections, where)
        parts = _stamped(projections)
        if any(t is not None and t.is_meta for t in (*parts, *buffers)):
            raise StaleKModeWeights(
                f"{where}: its weights or K-mode buffers are on the meta device (not loaded); load real weights first "
                "(model.to_empty(device=...) and load_state_dict), or slimify after loading"
            )
        for old, tensor in zip(self.sketches, parts, strict=True):
            if not _same(old, tensor, _WEIGHT_RTOL):
                raise StaleKModeWeights(
                    f"{where}: the key/value weights changed after slimify (load_state_dict, an optimizer step or an "
                    "in-place edit), so its K-mode W_KV = W_K^-1 W_V is stale and decode would use the old weights. "
                    "Call hf_slim.unslimify(model) and hf_slim.slimify(model, mode='k') again after changing weights "
                    "(or, without RoPE, use mode='input', which always reads the live weights)"
                )
        if buffers_too and not self._derived_match(buffers):
            rederive()  # the weights are the stamped ones: the buffers lost what was derived from them (to_empty)
            if not self._derived_match(buffers):
                raise StaleKModeWeights(
                    f"{where}: its K-mode buffers (W_KV, the value offset, z_proj) no longer match the weights they "
                    "were derived from, and solving them again did not reproduce them; call hf_slim.unslimify(model) "
                    "and hf_slim.slimify(model, mode='k') again"
                )
        self.versions = _versions(projections, buffers)  # same values (a device move or a reload): new counters

    def _derived_match(self, buffers: tuple[torch.Tensor, ...]) -> bool:
        return len(buffers) == len(self.derived) and all(
            _same(old, buffer, _derived_rtol(buffer.dtype)) for old, buffer in zip(self.derived, buffers, strict=True)
        )
