"""The slim cache: one tensor per token per layer, behind the transformers v5 cache protocol.

``SlimCache`` subclasses ``DynamicCache`` so that generation utilities which accept "a dynamic cache" (cropping for
assisted decoding, batch selection, ``EncoderDecoderCache`` checks) keep working; every per-layer operation is
delegated to its layers (:mod:`hf_slim.cache_layers`), which never hold keys/values. Writing K/V into it raises, so a
slim cache handed to an unpatched model fails loudly instead of silently mixing layouts. What a RoPE K cache keeps
beside the layers is :mod:`hf_slim.rotary_positions`; the cross-attention part of an encoder-decoder slim cache is
:mod:`hf_slim.encoder_cache`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    EncoderDecoderCache,
    StaticLayer,
)

from .cache_layers import NOT_KV_MESSAGE, SlimLayer, SlimLayout, StaticSlimLayer
from .rope import RotarySource, Unrotation
from .rotary_positions import RotaryPositions
from .step import SlimStep, StepInputs


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
            raise TypeError(NOT_KV_MESSAGE)
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
            raise TypeError(NOT_KV_MESSAGE)
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
