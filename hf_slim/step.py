"""What one slim attention step hands from the layer's forward, through ``cache.update``, to the attention function.

The layer's forward wrapper stages its inputs (:class:`StepInputs`) in the cache; the cache's ``update`` returns a
:class:`SlimStep` in place of keys and values; hf_slim's attention function (:mod:`hf_slim.interface`) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import SlimCache


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
