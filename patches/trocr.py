"""TrOCR: the text decoder of TrOCR checkpoints (``TrOCRForCausalLM``, usually inside a VisionEncoderDecoderModel).

Where things are: each decoder layer has ``self_attn`` (causal self-attention: slim input or K cache) and, when the
config is a decoder, ``encoder_attn`` (cross-attention over the image encoder's output E, whose width
``cross_attention_hidden_size`` may differ from ``hidden_size``: ``k_proj``/``v_proj`` map it to ``hidden_size``; the
absorbed query lives in that encoder width). Projections are ``nn.Linear`` with biases.

TrOCR specifics (transformers 5.15 to 5.25): its attention is written out by hand (``torch.bmm``, additive float
mask, softmax in the input dtype), with the query multiplied by ``head_dim ** -0.5`` before the dot product; the model
has no SDPA path. That arithmetic is BART's ``eager_attention_forward`` with scaling 1.0, which the slim prefill
runs: the toolkit's :func:`~hf_slim.toolkit.prescaled_attention_patch` (LED's decoder is served the same way).
Positions are learned or sinusoidal absolute embeddings added to the token embeddings, indexed by the cache length
(which a SlimCache reports the same way): the input and encoder caches apply exactly.
"""

from __future__ import annotations

from transformers.models.bart.modeling_bart import eager_attention_forward
from transformers.models.trocr.modeling_trocr import TrOCRAttention, TrOCRDecoder

from hf_slim.toolkit import prescaled_attention_patch

PATCH = prescaled_attention_patch(TrOCRAttention, TrOCRDecoder, eager_attention_forward, composite_decoder=True)
