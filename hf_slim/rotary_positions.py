"""What a slim cache keeps once for its RoPE K-mode layers to un-rotate their keys: positions, regimes or cos/sin.

Each token's position (and frequency regime), from which the layers recompute the cos/sin that un-rotate their keys
(:mod:`hf_slim.rope`); after a fallback, the cos/sin table itself.
"""

from __future__ import annotations

import warnings

import torch

from .cache_layers import SlimLayer, StaticSlimLayer
from .rope import RotaryFallbackWarning, RotarySource, Unrotation, cos_sin_table


class RotaryPositions:
    """What a :class:`~hf_slim.cache.SlimCache` keeps so that its RoPE K-mode layers can un-rotate their keys
    (:mod:`hf_slim.rope`), once for all layers.

    * ``positions``: a slim layer of int32 ``(batch, seq, 1)``, the position id each token was rotated at, or
      ``(batch, seq, 2)`` with the token's regime id in the second column for history-dependent rope types;
    * ``regimes``: ``(R, rotary_dim / 2)`` float32, the distinct ``inv_freq`` seen at write time (``scales``: their
      ``attention_scaling``), ``R`` rows of a buffer grown by doubling (:attr:`regime_buffer`);
    * ``table``: only after a fallback, the ``(batch, seq, 2 * rotary_dim)`` cos | sin table as the model handed it.

    The first K-mode layer that writes (the *leader*) records the new tokens, recomputes the working table
    ``(batch, seq, 2 * rotary_dim)`` for the whole cache (checking the new rows against the model's on eager calls)
    and keeps it for the other layers of the same step in ``step_table``, which is not part of the cache:
    :meth:`end_step` drops it after each forward, and nothing counts it in the cache's bytes.
    """

    def __init__(self, static_length: int | None = None) -> None:
        self.static_length = static_length
        self.positions: SlimLayer | None = None  # (b, n, 1|2) int32
        self.table: SlimLayer | None = None  # (b, n, 2r), after a fallback only
        self.regime_buffer: torch.Tensor | None = None  # (capacity, r/2) float32; the first num_regimes rows are used
        self.scales: list[float] = []
        self.leader: int | None = None
        self.step_table: torch.Tensor | None = None  # (b, n, 2r), this step's working table, not cached
        self.step_unrotation: tuple[torch.Tensor, Unrotation] | None = None  # the step table and its inverse

    @property
    def regimes(self) -> torch.Tensor | None:
        """``(R, rotary_dim / 2)`` float32: the recorded frequency sets, in registration order."""
        return None if self.regime_buffer is None else self.regime_buffer[: len(self.scales)]

    def _new_layer(self) -> SlimLayer:
        return SlimLayer() if self.static_length is None else StaticSlimLayer(self.static_length)

    def update(
        self,
        layer: SlimLayer,
        layer_idx: int,
        rotary: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor | None,
        source: RotarySource | None,
    ) -> torch.Tensor:
        """The cos | sin table ``(batch, seq, 2 * rotary_dim)`` of layer ``layer_idx`` after it wrote its new tokens
        (a static cache: ``max_cache_len`` rows; unwritten rows are masked by the attention).

        Parameters
        ----------
        layer:
            the slim layer just written (its length counts the new tokens).
        rotary:
            ``(cos, sin)``, each ``(batch|1, new, rotary_dim)``, what the model handed the attention for the new
            tokens (only the leading layer reads them).
        position_ids:
            ``(batch|1, new)`` the positions they were computed for, as the model's forward got them, or None.
        source:
            how to recompute cos/sin from positions (:class:`~hf_slim.rope.RotaryFrequencies`,
            :class:`~hf_slim.rope.SinusoidPositions`), or None.
        """
        if self.leader is None:
            self.leader = layer_idx
        if layer_idx != self.leader:
            return self._current_step_table(layer)
        cos_sin = cos_sin_table(*rotary, layer.states.shape[0])  # (b, t, 2r)
        batch, new, _ = cos_sin.shape
        if self.table is None:
            reason = _not_recomputable(source, position_ids, batch, new)
            if reason is not None:
                old = None
                if self.positions is not None and self.positions.states is not None:
                    if source is None:
                        raise RuntimeError(f"hf_slim: cannot recompute the cached tokens' cos/sin: {reason}")
                    old = self._recompute(self.positions.states, source, cos_sin.dtype)  # (b, n - t | L, 2r)
                self.step_table = self._fall_back(old, cos_sin, layer, reason)
                return self.step_table
            self.step_table = self._record(layer, cos_sin, position_ids, source)
            return self.step_table
        if isinstance(self.table, StaticSlimLayer):
            self.step_table = self.table.overwrite_last(cos_sin, layer.cumulative_length)
        else:
            self.step_table = self.table.update_slim(cos_sin)
        return self.step_table

    def _record(self, layer, cos_sin, position_ids, source) -> torch.Tensor:
        """Append the new tokens' positions (and regime), recompute the table, check the new rows on eager calls."""
        batch, new, _ = cos_sin.shape
        columns = position_ids.to(torch.int32).expand(batch, new)[..., None]  # (b, t, 1)
        if not source.position_pure:
            regime = self._regime_id(source, cos_sin.device)
            columns = torch.cat([columns, torch.full_like(columns, regime)], dim=-1)  # (b, t, 2)
        elif self.regime_buffer is None and source.frequencies() is not None:
            self._regime_id(source, cos_sin.device)  # the one fixed set, registered at the first write
        if self.positions is None:
            self.positions = self._new_layer()
        if isinstance(self.positions, StaticSlimLayer):
            states = self.positions.overwrite_last(columns, layer.cumulative_length)  # (b, L, 1|2)
        else:
            states = self.positions.update_slim(columns)  # (b, n, 1|2)
        table = self._recompute(states, source, cos_sin.dtype)  # (b, n, 2r)
        if torch.compiler.is_compiling():
            return table
        new_rows = table.index_select(1, layer.query_slots(new).to(table.device))  # (b, t, 2r): the tokens just written
        if not reproduces(new_rows, cos_sin):
            old = table if isinstance(self.positions, StaticSlimLayer) else table[:, :-new]
            return self._fall_back(
                old, cos_sin, layer, "the cos/sin recomputed from the positions differ from the model's"
            )
        return table

    def _recompute(self, states: torch.Tensor, source: RotarySource, dtype: torch.dtype) -> torch.Tensor:
        """``states: (batch, n, 1|2)`` positions (| regime ids) -> ``(batch, n, 2 * rotary_dim)`` cos | sin."""
        positions = states[..., 0]  # (b, n)
        regimes = self.regimes
        if regimes is None:  # GPT-J: a fixed table
            return source.table(positions, None, None, dtype)
        if states.shape[-1] == 1:  # position-pure: one regime
            return source.table(positions, regimes[0], self.scales[0], dtype)
        ids = states[..., 1].long()  # (b, n)
        scaling = self.scales[0]
        if any(scale != scaling for scale in self.scales):
            scaling = torch.tensor(self.scales, device=states.device)[ids][..., None]  # (b, n, 1)
        return source.table(positions, regimes[ids], scaling, dtype)  # per-token frequencies (b, n, r/2)

    @torch.compiler.disable
    def _regime_id(self, source: RotarySource, device: torch.device) -> int:
        """Index of the source's current frequencies among the recorded ones, registering them if new (eager even
        under ``torch.compile``: history-dependent types graph-break here, as transformers' dynamic update does)."""
        inv_freq, scaling = source.frequencies()
        inv_freq = inv_freq.detach().to(device=device, dtype=torch.float32)  # (r/2,)
        regimes = self.regimes
        if regimes is not None:
            last = len(self.scales) - 1
            if self.scales[last] == scaling and torch.equal(regimes[last], inv_freq):
                return last
            for index in torch.nonzero((regimes == inv_freq).all(dim=-1)).flatten().tolist():
                if self.scales[index] == scaling:
                    return index
        count = len(self.scales)
        if self.regime_buffer is None or count == self.regime_buffer.shape[0]:
            grown = inv_freq.new_empty((max(2 * count, 1), inv_freq.numel()))  # doubling: O(1) amortised per regime
            if count:
                grown[:count] = self.regime_buffer
            self.regime_buffer = grown
        self.regime_buffer[count] = inv_freq
        self.scales.append(scaling)
        return count

    def _fall_back(
        self, old: torch.Tensor | None, cos_sin: torch.Tensor, layer: SlimLayer, reason: str
    ) -> torch.Tensor:
        """Switch this cache to storing the cos | sin table: ``old`` (the recomputed rows of earlier tokens, checked
        when they were written; a static cache's full table) followed by the model's ``cos_sin`` for the new ones."""
        warnings.warn(
            f"hf_slim: {reason}; this slim cache keeps the cos/sin table from now on (exact, 2 * rotary_dim numbers "
            "per token more than positions)",
            RotaryFallbackWarning,
            stacklevel=2,
        )
        self.table = self._new_layer()
        self.positions, self.regime_buffer, self.scales = None, None, []
        if isinstance(self.table, StaticSlimLayer):
            if old is not None:
                self.table.lazy_initialization(old)
                self.table.states.copy_(old)
            return self.table.overwrite_last(cos_sin, layer.cumulative_length)
        return self.table.update_slim(cos_sin if old is None else torch.cat([old, cos_sin], dim=1))

    def _current_step_table(self, layer: SlimLayer) -> torch.Tensor:
        """The table the leader built in this step, for a following layer."""
        table = self.step_table
        stale = table is None or (
            not isinstance(layer, StaticSlimLayer)
            and not torch.compiler.is_compiling()
            and table.shape[1] != layer.get_seq_length()
        )
        if stale:
            raise RuntimeError(
                f"hf_slim: slim layer {layer!r} needs the rotary table of this step, which layer {self.leader} (the "
                "first K-mode layer) builds: run the whole model forward at each step"
            )
        return table

    def unrotation(self, table: torch.Tensor) -> Unrotation:
        """The :class:`~hf_slim.rope.Unrotation` of this step's ``table``, prepared once for all its layers."""
        if self.step_unrotation is None or self.step_unrotation[0] is not table:
            self.step_unrotation = (table, Unrotation.of(table))
        return self.step_unrotation[1]

    def end_step(self) -> None:
        """Drop the working table (called after every forward of a model that owns the cache)."""
        self.step_table = None
        self.step_unrotation = None

    def layers(self) -> list[SlimLayer]:
        return [layer for layer in (self.positions, self.table) if layer is not None]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this keeps between steps (what :func:`~hf_slim.cache.cache_nbytes` counts)."""
        kept = [layer.states for layer in self.layers() if layer.states is not None]
        return kept + ([self.regime_buffer] if self.regime_buffer is not None else [])

    def reset(self) -> None:
        """Forget every token and regime; static layers keep their storage (fixed addresses)."""
        for layer in self.layers():
            layer.reset()
        self.regime_buffer, self.scales, self.leader, self.step_table = None, [], None, None
        self.step_unrotation = None


def reproduces(recomputed: torch.Tensor, handed: torch.Tensor) -> bool:
    """Whether the recomputed cos | sin rows of the new tokens are bit for bit the ones the model handed its
    attention, ``(batch, new, 2 * rotary_dim)`` each (one host sync per step, on the leading layer only)."""
    return torch.equal(recomputed, handed)


def _not_recomputable(
    source: RotarySource | None, position_ids: torch.Tensor | None, batch: int, new: int
) -> str | None:
    """Why the cos/sin of ``new`` tokens cannot be recomputed from their positions, or None."""
    if source is None:
        return "found no rotary embedding module to recompute cos/sin from in this model"
    if position_ids is None:
        return "the attention got no position_ids"
    if (
        position_ids.dim() != 2
        or position_ids.is_floating_point()
        or position_ids.shape[-1] != new
        or position_ids.shape[0] not in (1, batch)
    ):
        return f"position_ids {tuple(position_ids.shape)} do not give one position per new token of {batch} rows"
    return None
