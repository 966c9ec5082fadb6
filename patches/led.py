"""LED (Longformer Encoder-Decoder): its decoder's self-attention keeps a slim cache, cross-attention none.

Where things are: the encoder's Longformer self-attention (sliding windows, global tokens) keeps no cache and stays
untouched; each decoder layer has ``self_attn`` and ``encoder_attn``, both ``LEDDecoderAttention``: BART's attention
written out by hand (transformers 5.15 to 5.25 compute it in the class, with no attention interface and no SDPA
path), ``nn.Linear`` projections with biases, the query multiplied by ``head_dim ** -0.5`` before ``torch.bmm``, the
cache returned as a third output. That is TrOCR's attention: the toolkit's
:func:`~hf_slim.toolkit.prescaled_attention_patch` serves both (BART's ``eager_attention_forward`` at scaling 1.0 for
the prefill, the same arithmetic).

Positions: learned absolute embeddings added to the token embeddings, indexed by the cache length, which a SlimCache
reports the same way: the input and encoder caches apply exactly. ``LEDDecoder`` builds no mask for single-token
steps (decode attends to every cached token, padding included), which the slim decode follows. With a static cache
the unpatched LED therefore attends to the unfilled slots too (its greedy tokens differ from its own dynamic cache's),
which a slim cache (holding inputs, not keys) cannot reproduce: the patch refuses ``cache_implementation="static"``.
"""

from __future__ import annotations

from transformers.models.bart.modeling_bart import eager_attention_forward
from transformers.models.led.modeling_led import LEDDecoder, LEDDecoderAttention

from hf_slim.toolkit import one_encoder_output_per_input, prescaled_attention_patch

PATCH = prescaled_attention_patch(
    LEDDecoderAttention,
    LEDDecoder,
    eager_attention_forward,
    return_cache=True,
    extra_patches=one_encoder_output_per_input,
    static_cache_refusal="LEDDecoder builds no attention mask for single-token steps, so with a static cache the "
    "unpatched LED attends to the cache's unfilled slots (zero keys and values); a slim cache holds inputs, whose "
    "empty slots do not project to zero keys and values, so it cannot reproduce that: use the dynamic cache",
)
