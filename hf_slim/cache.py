"""The slim cache: one tensor per token per layer, behind the transformers v5 cache protocol.

A vanilla ``DynamicCache`` layer holds keys and values, ``(batch, heads, seq, head_dim)`` each. A slim layer holds a
single ``(batch, seq, width)`` tensor: the attention input X (input cache) or the keys K (K cache). Which one is the
business of the attention layer that writes it; the cache only stores, grows, reorders, crops and selects rows.

``SlimCache`` subclasses ``DynamicCache`` so that generation utilities which accept "a dynamic cache" (cropping for
assisted decoding, batch selection, ``EncoderDecoderCache`` checks) keep working; every per-layer operation is
delegated to :class:`SlimLayer`, which never holds keys/values. Writing K/V into it raises, so a slim cache handed to
an unpatched model fails loudly instead of silently mixing layouts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    EncoderDecoderCache,
    StaticLayer,
)

from .rope import RotaryFallbackWarning, RotarySource, Unrotation, cos_sin_table

_NOT_KV_MESSAGE = (
    "this cache is an hf_slim SlimCache: it stores one slim tensor per token (the attention input or the keys), not "
    "keys and values. It can only be used by a model patched with hf_slim.slimify(); for an unpatched model pass "
    "no cache or a transformers DynamicCache."
)


class CacheOwner:
    """The identity of one slimified model, carried by every slim cache layer it writes.

    Why: slim layers of different models (or of one model's input-mode and K-mode layers) hold different things of
    possibly the same shape; a cache written by one model and handed to another would be read as the wrong tensor
    without any error. Compared by identity; a deep copy of a slim model gets a new owner (its weights may change
    independently), and so does an unpickled one.
    """

    def __deepcopy__(self, memo) -> CacheOwner:
        return CacheOwner()

    def __repr__(self) -> str:
        return f"<hf_slim model {id(self):#x}>"


@dataclass(frozen=True)
class SlimLayout:
    """What a slim cache layer holds: which model wrote it and what kind of tensor (``"input"`` X or ``"k"`` K)."""

    owner: CacheOwner
    mode: str


@dataclass
class StepInputs:
    """What a slim attention layer needs in one forward besides what transformers hands its cache and its attention
    function: the layer's own inputs, staged by the layer's forward wrapper (:mod:`hf_slim.interface`) in the cache it
    was given, for the ``update`` call and the attention function the model's unchanged forward makes next.

    Why in the cache: the cache object is what the model passes from its forward to ``cache.update`` and from there to
    the attention function; keeping the inputs there (not on the module) keeps concurrent forwards of one model with
    different caches apart.

    Shapes: ``hidden_states: (batch, new, d_model)`` (X); ``rotary``: ``(cos, sin)``, each ``(batch|1, new,
    rotary_dim)``, as the model rotated the keys; ``position_ids: (batch|1, new)``; ``encoder_states: (inputs,
    frames, d_enc)`` (cross-attention).
    """

    hidden_states: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    encoder_states: torch.Tensor | None = None
    #: set by the attention function when it served the step (the forward wrapper checks it)
    attended: bool = field(default=False, compare=False)


@dataclass
class SlimStep:
    """What a slim cache's ``update`` returns in place of keys and values, for hf_slim's attention function.

    The model's forward passes ``cache.update``'s result straight to its attention function; that function is
    hf_slim's (:mod:`hf_slim.interface`), which reads this: the layer's inputs, the fresh keys/values of the new
    tokens as the model computed them (``(batch, heads, new, head_dim)``; None for cross-attention steps that read
    the encoder output), and the slim cache to write (None for cross-attention, which keeps no cache).
    """

    inputs: StepInputs
    cache: SlimCache | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    #: how many keys the unpatched layer would attend over after this update (past + new, a static layer's every slot)
    key_length: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, heads, keys, head_dim)`` of the keys ``update`` would have returned, -1 where not known: what
        a model's forward reads of them besides handing them on (T5 sizes its position bias by ``shape[-2]``)."""
        keys = self.key_length
        if keys is None and self.inputs.encoder_states is not None:  # cross-attention: the encoder's frames
            keys = self.inputs.encoder_states.shape[1]
        batch, heads, _, head_dim = (-1, -1, -1, -1) if self.key is None else self.key.shape
        return batch, heads, -1 if keys is None else keys, head_dim

    def __repr__(self) -> str:
        return "<hf_slim SlimStep: only hf_slim's attention function reads this, not a key/value tensor>"


class SlimLayer(CacheLayerMixin):
    """One layer's slim tensor, ``(batch, seq, width)``, grown by concatenation.

    Why a separate layer class: transformers computes masks and positions from ``get_seq_length`` /
    ``get_mask_sizes`` of the cache layers, so those must count slim tokens exactly as a K/V layer counts keys.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.states: torch.Tensor | None = None  # (b, n, w)
        self.layout: SlimLayout | None = None

    def __repr__(self) -> str:
        shape = None if self.states is None else tuple(self.states.shape)
        return f"{self.__class__.__name__}(states={shape})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(_NOT_KV_MESSAGE)

    def check_layout(self, layout: SlimLayout | None) -> None:
        """Adopt ``layout`` on the first write; refuse a write by another model or of another kind of tensor."""
        if layout is None or torch.compiler.is_compiling():
            return
        if self.layout is None:
            self.layout = layout
        elif self.layout != layout:
            same_model = self.layout.owner is layout.owner
            raise ValueError(
                f"this slim cache layer holds {self.layout.mode!r}-mode states "
                f"{'of this model' if same_model else 'written by another slimified model'}, but a "
                f"{layout.mode!r}-mode layer of {'this' if same_model else 'another'} model is writing to it. A slim "
                "cache belongs to the model that filled it: start a new cache (pass none) for this model"
            )

    def update_slim(self, states: torch.Tensor, layout: SlimLayout | None = None) -> torch.Tensor:
        """Append ``states: (batch, new, width)`` and return the whole layer ``(batch, seq, width)``.

        ``layout`` says who writes and what (see :class:`SlimLayout`); a mismatch with the layer's raises.
        """
        self.check_layout(layout)
        if self.states is None:
            self.lazy_initialization(states)
            self.states = states
        else:
            if states.shape[0] != self.states.shape[0] or states.shape[-1] != self.states.shape[-1]:
                raise ValueError(
                    f"slim cache layer holds {tuple(self.states.shape)} but got new states {tuple(states.shape)}: "
                    "batch size and width must match the cached ones"
                )
            self.states = torch.cat([self.states, states], dim=1)
        return self.states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.states is None else self.states.shape[1]

    def query_slots(self, num_queries: int) -> torch.Tensor:
        """The slots ``(num_queries,)`` (long) of the last ``num_queries`` written tokens: the rows of a mask
        indexed by cache slot (GPT-Neo's window) that the newest queries read."""
        length = self.get_seq_length()
        return torch.arange(length - num_queries, length, device=self.states.device)

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        if self.states is not None:
            self.states = self.states.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.states is not None and self.states.device != self.device:
            self.states = self.states.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.states = None
        self.layout = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.states is not None:
            self.states = self.states.index_select(0, beam_idx.to(self.states.device))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as transformers' DynamicLayer does")
        if tokens_to_remove < 0 and self.states is not None:
            self.states = self.states[:, :tokens_to_remove]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.states is not None:
            self.states = self.states.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.states is not None:
            self.states = self.states[indices]

    @property
    def nbytes(self) -> int:
        return 0 if self.states is None else self.states.numel() * self.states.element_size()


class StaticSlimLayer(SlimLayer):
    """A preallocated slim layer, ``(batch, max_cache_len, width)``, written in place: fixed addresses for
    ``torch.compile(mode="reduce-overhead")`` / CUDA graphs, like transformers' ``StaticLayer`` for K/V.

    ``cumulative_length`` is a 0-d tensor (not an int) so that decode steps do not recompile; slots at or past it
    are unwritten and the attention masks them (:meth:`causal_bias`).
    """

    is_compileable = True
    is_croppable = False

    def __init__(self, max_cache_len: int, **kwargs) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long, device="cpu")  # to the states' device at init

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        super().lazy_initialization(key_states)
        batch, _, width = key_states.shape
        self.batch_size = batch
        self.states = torch.zeros((batch, self.max_cache_len, width), dtype=self.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.states)
            torch._dynamo.mark_static_address(self.cumulative_length)

    def update_slim(self, states: torch.Tensor, layout: SlimLayout | None = None) -> torch.Tensor:
        self.check_layout(layout)
        if not self.is_initialized:
            self.lazy_initialization(states)
        positions = torch.arange(states.shape[1], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(states.shape[1])
        self.states.index_copy_(1, positions, states)
        return self.states

    def overwrite_last(self, states: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Write ``states: (batch, new, width)`` at slots ``[length - new, length)`` and set the length to ``length``.

        Used for the per-cache side tensors of :class:`RotaryPositions`, whose length follows the layer that wrote
        (a tensor: no host sync, no data-dependent branch under ``torch.compile``).
        """
        if not self.is_initialized:
            self.lazy_initialization(states)
        positions = torch.arange(states.shape[1], device=self.device) + length.to(self.device) - states.shape[1]
        self.states.index_copy_(1, positions, states)
        self.cumulative_length.copy_(length)
        return self.states

    def query_slots(self, num_queries: int) -> torch.Tensor:
        """As :meth:`SlimLayer.query_slots`, from the length tensor (no host sync, no recompile per step)."""
        return torch.arange(num_queries, device=self.device) + self.cumulative_length - num_queries  # (t,)

    def causal_bias(self, num_queries: int) -> torch.Tensor:
        """``(1, 1, queries, max_cache_len)`` float32 bias for the last ``num_queries`` written tokens: 0 where the
        slot is written and not in the query's future, dtype-min elsewhere (computed from the length tensor, so it
        needs no host sync)."""
        key_pos = torch.arange(self.max_cache_len, device=self.device)  # (n,)
        visible = key_pos[None, :] <= self.query_slots(num_queries)[:, None]  # (t, n)
        return torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self.states.zero_()
        self.cumulative_length.zero_()
        self.layout = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.states.copy_(self.states.index_select(0, beam_idx.to(self.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a static slim cache cannot be cropped; use the default dynamic slim cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static slim cache has a fixed batch size")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static slim cache has a fixed batch size")


class RotaryPositions:
    """What a :class:`SlimCache` keeps so that its RoPE K-mode layers can un-rotate their keys (:mod:`hf_slim.rope`),
    once for all layers.

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
        """The tensors this keeps between steps (what :func:`cache_nbytes` counts)."""
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


class SlimCache(DynamicCache):
    """A cache of :class:`SlimLayer` s, one per attention layer that keeps per-token state.

    Two additions serve RoPE models (see :mod:`hf_slim.rope`):

    * a *mixed* cache: the layers listed in ``kv_layers`` are ordinary transformers K/V layers, written by unpatched
      attention modules through :meth:`update` (layers where the K cache would not be exact keep the model's own K
      and V);
    * the *rotary positions*, :attr:`rotary` (:class:`RotaryPositions`), shared by every layer (all layers of a step
      rotate with the same cos/sin): each token's position id (int32) and, for dynamic NTK / longrope, the
      frequency regime it was written with, from which the K-cache layers recompute the cos/sin that un-rotate their
      keys for the values. They are reordered, cropped and batch-selected with the layers.

    Parameters
    ----------
    num_layers:
        number of layers to create up front; ``None`` grows the list on first write to a layer.
    max_cache_len:
        preallocate every layer for this many tokens (:class:`StaticSlimLayer`), for ``torch.compile`` and CUDA
        graphs; needs ``num_layers``. ``generate(..., cache_implementation="static")`` on a slim model builds one.
    kv_layers:
        indices of the layers that hold keys and values (needs ``num_layers``).
    """

    def __init__(
        self, num_layers: int | None = None, max_cache_len: int | None = None, kv_layers: tuple[int, ...] = ()
    ) -> None:
        if (max_cache_len is not None or kv_layers) and num_layers is None:
            raise ValueError("a static SlimCache (max_cache_len) or one with kv_layers needs num_layers")
        if num_layers is None:
            Cache.__init__(self, layer_class_to_replicate=SlimLayer)
        else:
            Cache.__init__(self, layers=[self._new_layer(i in kv_layers, max_cache_len) for i in range(num_layers)])
        self._static_length = max_cache_len  # (Cache.max_cache_len is a read-only property in older transformers)
        self.rotary: RotaryPositions | None = None
        self._staged: dict[int, StepInputs] = {}  # per layer, from its forward wrapper to its update call
        #: the model's K-mode buffers were checked against its weights before this cache was first written
        #: (hf_slim.generation.check_derived_state)
        self.derived_state_checked = False

    @staticmethod
    def _new_layer(kv: bool, max_cache_len: int | None) -> CacheLayerMixin:
        if kv:
            return DynamicLayer() if max_cache_len is None else StaticLayer(max_cache_len)
        return SlimLayer() if max_cache_len is None else StaticSlimLayer(max_cache_len)

    def __iter__(self):
        for layer in self.layers:
            yield (layer.states,) if isinstance(layer, SlimLayer) else (layer.keys, layer.values)

    def stage(self, layer_idx: int, inputs: StepInputs) -> None:
        """Keep a slim layer's inputs for the ``update`` call its forward makes next (see :class:`StepInputs`)."""
        self._layer(layer_idx, SlimLayer)  # a K/V layer here: raises
        self._staged[layer_idx] = inputs

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """What the model's attention forward calls with the new tokens' keys and values.

        A ``kv_layers`` layer (an unpatched attention module of a mixed cache) stores them as transformers does. A slim
        layer returns a :class:`SlimStep` twice (as keys and as values) for hf_slim's attention function, which writes
        the slim tensor; an unpatched model writing keys and values into a slim layer gets a clear error.
        """
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is not None and not isinstance(layer, SlimLayer):
            return layer.update(key_states, value_states, *args, **kwargs)
        inputs = self._staged.pop(layer_idx, None)
        if inputs is None:
            raise TypeError(_NOT_KV_MESSAGE)
        if layer is not None and layer.is_compileable:
            key_length = layer.get_max_length()
        else:
            key_length = (0 if layer is None else layer.get_seq_length()) + key_states.shape[-2]
        step = SlimStep(inputs, self, key_states, value_states, key_length)
        return step, step

    def update_slim(self, states: torch.Tensor, layer_idx: int, layout: SlimLayout | None = None) -> torch.Tensor:
        """Append ``states: (batch, new, width)`` to layer ``layer_idx``; return the layer's ``(batch, seq, width)``.

        ``layout``: the writing layer's :class:`SlimLayout`; a layer filled by another model or mode refuses it.
        """
        return self._layer(layer_idx, SlimLayer).update_slim(states, layout)

    def _layer(self, layer_idx: int, kind: type) -> CacheLayerMixin:
        """Layer ``layer_idx``, which must be of ``kind`` (slim or K/V): a layer of the other kind means a model that
        is not (or differently) slimified writes to this cache, a clear error instead of mixed layouts."""
        while self.layer_class_to_replicate is not None and kind is SlimLayer and len(self.layers) <= layer_idx:
            self.layers.append(SlimLayer())
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if kind is SlimLayer and not isinstance(layer, SlimLayer):
            raise TypeError(
                f"hf_slim: layer {layer_idx} of this SlimCache holds keys and values, but a slim attention layer "
                "wrote to it; let the slim model create its own cache"
            )
        if kind is DynamicLayer and (layer is None or isinstance(layer, SlimLayer)):
            raise TypeError(_NOT_KV_MESSAGE)
        return layer

    def adopt_layout(self, num_layers: int, kv_layers: tuple[int, ...]) -> None:
        """Give a fresh ``SlimCache()`` (created without ``num_layers``) the layer kinds of a mixed model, so that
        users can pass ``SlimCache()`` to any slim model. A cache already written to is left as it is."""
        if kv_layers and self.layer_class_to_replicate is not None and not self.layers:
            self.layers = [self._new_layer(i in kv_layers, None) for i in range(num_layers)]
            self.layer_class_to_replicate = None

    def update_rotary(
        self,
        rotary: tuple[torch.Tensor, torch.Tensor],
        layer_idx: int,
        position_ids: torch.Tensor | None = None,
        source: RotarySource | None = None,
    ) -> Unrotation:
        """Record the rotary state of the tokens layer ``layer_idx`` just wrote and return what un-rotates the layer's
        keys: the :class:`~hf_slim.rope.Unrotation` of the cos | sin table ``(batch, seq, 2 * rotary_dim)`` (see
        :class:`RotaryPositions`: the first layer of a step records and builds the table and its inverse, the others
        reuse them).

        ``rotary``: the ``(cos, sin)``, each ``(batch|1, new, rotary_dim)``, the model handed the attention,
        ``position_ids: (batch|1, new)`` the positions they were computed for, ``source`` how to recompute them.
        """
        if self.rotary is None:
            self.rotary = RotaryPositions(self._static_length)
        table = self.rotary.update(self.layers[layer_idx], layer_idx, rotary, position_ids, source)
        return self.rotary.unrotation(table)

    def end_step(self) -> None:
        """Drop per-step working state (the rotary table of the step); the cache's owner calls it after a forward."""
        if self.rotary is not None:
            self.rotary.end_step()

    def _side_layers(self) -> list[SlimLayer]:
        return [] if self.rotary is None else self.rotary.layers()

    def _side_tensors(self) -> list[torch.Tensor]:
        """Tensors kept beside the layers, for all of them (RoPE positions, regimes or the cos/sin table)."""
        return [] if self.rotary is None else self.rotary.tensors()

    def reset(self) -> None:
        super().reset()
        if self.rotary is not None:
            self.rotary.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.end_step()
        for layer in self._side_layers():
            layer.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.end_step()
        for layer in self._side_layers():
            layer.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.end_step()
        for layer in self._side_layers():
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.end_step()
        for layer in self._side_layers():
            layer.batch_select_indices(indices)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors (what the memory claims count), RoPE positions and regimes included (not
        the per-step working table, which no step keeps)."""
        return cache_nbytes(self)


class EncoderOutputLayer(CacheLayerMixin):
    """One decoder layer's cross-attention "cache" of a slim model: it keeps nothing between steps.

    The model's cross-attention forward either calls :meth:`update` with keys/values of the encoder output (first step)
    or, once ``EncoderDecoderCache.is_updated`` says so, reads ``keys`` / ``values`` of this layer; either way it gets
    a :class:`SlimStep` for hf_slim's attention function, which reads the encoder output E itself (staged by the
    layer's forward wrapper): no cross-attention keys or values are ever kept.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states=None) -> None:
        return None

    def stage(self, inputs: StepInputs) -> None:
        """The step's inputs: what ``keys``/``values`` hand the attention function until the next stage."""
        self.keys = self.values = SlimStep(inputs)

    def release(self) -> None:
        """Forget the step's inputs (they hold the encoder output, which generate() keeps anyway)."""
        self.keys = self.values = None

    def update(self, key_states, value_states, *args, **kwargs):
        step = self.keys
        if not isinstance(step, SlimStep):
            raise TypeError(_NOT_KV_MESSAGE)
        fresh = SlimStep(step.inputs, None, key_states, value_states)
        return fresh, fresh

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None

    def reset(self) -> None:
        self.release()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        return None

    def crop(self, tokens_to_remove: int) -> None:
        return None

    def batch_repeat_interleave(self, repeats: int) -> None:
        return None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        return None


class EncoderOutputCache(Cache):
    """The cross-attention part of a slim encoder-decoder cache (``EncoderDecoderCache(SlimCache, this)``): layers
    that keep nothing (:class:`EncoderOutputLayer`); cross-attention reads the encoder output generate() holds."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=EncoderOutputLayer)

    def layer(self, layer_idx: int) -> EncoderOutputLayer:
        """Layer ``layer_idx``, created on first use."""
        while len(self.layers) <= layer_idx:
            self.layers.append(EncoderOutputLayer())
        return self.layers[layer_idx]

    def stage(self, layer_idx: int, inputs: StepInputs) -> None:
        self.layer(layer_idx).stage(inputs)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layer(layer_idx).update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def adopt_cross_part(cache: EncoderDecoderCache) -> None:
    """Give a slim encoder-decoder cache the cross-attention part slim cross-attention reads
    (:class:`EncoderOutputCache`) where it has an empty one of another kind: what transformers builds in a forward
    (GPT-2's ``EncoderDecoderCache(cache, DynamicCache())`` when it adds cross-attention), or what hf_slim documented
    before (``EncoderDecoderCache(SlimCache(), SlimCache(0))``). An empty part holds nothing, so nothing is lost; a
    cross part with keys and values in it is left alone (slim cross-attention then refuses it)."""
    cross = cache.cross_attention_cache
    if not isinstance(cache.self_attention_cache, SlimCache) or isinstance(cross, EncoderOutputCache):
        return
    if type(cross) in (SlimCache, DynamicCache) and cross.get_seq_length() == 0:
        cache.cross_attention_cache = EncoderOutputCache()


def self_attention_part(cache_object: Cache | None):
    """The self-attention cache of an ``EncoderDecoderCache``, or the cache itself (None stays None)."""
    return cache_object.self_attention_cache if isinstance(cache_object, EncoderDecoderCache) else cache_object


def slim_cache_for(cache_object: Cache | None, layer_idx: int, *, where: str) -> SlimCache | None:
    """Return the slim self-attention cache inside ``cache_object`` (a cache handed to a layer), or a clear error if
    it is not one.

    Why: a slimified layer must never write into a K/V cache (the layouts differ), and users can pass any cache
    object to ``forward`` / ``generate``; this is the one place that checks it.
    """
    if cache_object is None:
        return None
    cache = self_attention_part(cache_object)
    if isinstance(cache, SlimCache):
        return cache
    raise TypeError(
        f"hf_slim: {where} (layer {layer_idx}) is slimified but got a {type(cache).__name__}. If you passed no cache, "
        "the model you called created it because it is not the slimified one (slimify(model.transformer) and then "
        "model.generate()): slimify the model you call generate()/forward() on (slimify(model)). Otherwise let "
        "generate()/forward() create the cache (pass none), pass hf_slim.SlimCache(), or call "
        "hf_slim.unslimify(model) to use transformers' caches again."
    )


def cache_nbytes(cache_object: Cache | None) -> int:
    """Count the bytes of every tensor a cache object holds (slim or vanilla, encoder-decoder or not).

    Why: memory claims are measured on the objects generate() returns, not derived from formulas.
    """
    if cache_object is None:
        return 0
    if isinstance(cache_object, EncoderDecoderCache):
        return cache_nbytes(cache_object.self_attention_cache) + cache_nbytes(cache_object.cross_attention_cache)
    tensors = [getattr(layer, name, None) for layer in cache_object.layers for name in ("keys", "values", "states")]
    if isinstance(cache_object, SlimCache):
        tensors += cache_object._side_tensors()
    total = 0
    seen: set[int] = set()
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
