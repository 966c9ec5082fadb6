"""Slim cache layers: one ``(batch, seq, width)`` tensor per layer instead of keys and values, dynamic or static.

A vanilla ``DynamicCache`` layer holds keys and values, ``(batch, heads, seq, head_dim)`` each. A slim layer holds a
single ``(batch, seq, width)`` tensor: the attention input X (input cache) or the keys K (K cache). Which one is the
business of the attention layer that writes it; the layer only stores, grows, reorders, crops and selects rows.
:class:`SlimLayer` grows by concatenation, :class:`StaticSlimLayer` is preallocated for ``torch.compile``; each
remembers which model wrote it and what (:class:`CacheOwner`, :class:`SlimLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

NOT_KV_MESSAGE = (
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
        raise TypeError(NOT_KV_MESSAGE)

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

        Used for the per-cache side tensors of :class:`~hf_slim.rotary_positions.RotaryPositions`, whose length
        follows the layer that wrote
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
