"""The cross-attention part of a slim encoder-decoder cache, which keeps nothing: E is read where generate() has it."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, EncoderDecoderCache

from .cache import SlimCache
from .cache_layers import NOT_KV_MESSAGE
from .step import SlimStep, StepInputs


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
            raise TypeError(NOT_KV_MESSAGE)
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
