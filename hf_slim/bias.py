"""Additive score biases (ALiBi, T5's relative positions, GPT-Neo's window): where a layer's bias comes from.

The model's own attention adds them on the prefill path; the absorbed decode computes the scores itself, so it must add
exactly the same bias, no more and no less. transformers hands that bias to attention in one of three ways, and a
family can move from one to another between releases (Falcon's ALiBi: an ``alibi`` argument the layer adds up to
5.24, folded into the 4-D mask from 5.25). A family declares which one applies with a :class:`ScoreBias`, and the
slim paths read it in one place instead of every patch handling its own:

* **the mask carries it** (:meth:`ScoreBias.in_mask`): the model folded the bias into the float mask it hands the
  attention (Falcon from 5.25). The decode adds the mask as it is, and nothing else. A mask that cannot carry a bias
  (None, boolean) means the model no longer does what the route relies on: refused, never computed without the bias;
* **the attention function receives it** (:meth:`ScoreBias.keyword`): the model passes the bias to its attention
  function as a keyword (T5's ``position_bias``, every release). The prefill hands it on, cut to the keys attended
  over; the decode adds it;
* **the layer computes it from its inputs** (:meth:`ScoreBias.argument`, :meth:`ScoreBias.module`): the layer's own
  forward gets a tensor (BLOOM's and Falcon's ``alibi`` up to 5.24, MPT's ``position_bias``) or owns a buffer
  (GPT-Neo's window mask) and adds it itself; ``columns`` says which part of it the scores over a given number of
  cache slots see. Families whose releases still compute attention this way keep an adapted forward, which hands
  :meth:`ScoreBias.term` to :func:`hf_slim.attention.slim_self_attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._compat import TransformersContractError

#: ``columns(module, value, key_length, query_slots) -> (batch|1, heads|1, new|1, key_length)`` float bias: the part of
#: what the layer received (``value``: its bias argument, or None for a bias the module owns) that the scores of the
#: new tokens (``query_slots: (new,)``, their cache slots) over ``key_length`` cache slots see.
Columns = Callable[[torch.nn.Module, object, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScoreBias:
    """How one attention class gets its additive score bias (see the module docstring for the three sources).

    Attributes
    ----------
    source:
        ``"mask"``, ``"keyword"``, ``"argument"`` or ``"module"``.
    name:
        the attention function's keyword (``"keyword"``) or the layer forward's parameter (``"argument"``).
    columns:
        for the layer's own bias: which part of it the scores see (:data:`Columns`).
    """

    source: str
    name: str | None = None
    columns: Columns | None = None

    @classmethod
    def in_mask(cls) -> ScoreBias:
        """The model folded the bias into the float mask it hands the attention (Falcon from 5.25)."""
        return cls("mask")

    @classmethod
    def keyword(cls, name: str) -> ScoreBias:
        """The attention function receives the bias ``(1|batch, heads, new, keys)`` as keyword ``name`` (T5)."""
        return cls("keyword", name)

    @classmethod
    def argument(cls, name: str, columns: Columns) -> ScoreBias:
        """The layer's forward receives the bias as parameter ``name`` and adds ``columns`` of it (ALiBi up to 5.24)."""
        return cls("argument", name, columns)

    @classmethod
    def module(cls, columns: Columns) -> ScoreBias:
        """The layer adds a bias it owns (GPT-Neo's window mask buffer): ``columns(module, None, ...)``."""
        return cls("module", None, columns)

    def term(self, module: torch.nn.Module, value: object = None):
        """What the slim decode adds besides the mask, as :func:`hf_slim.attention.slim_self_attention` takes it
        (its ``position_bias``): None (the mask carries the bias), the bias tensor the attention function received
        (``value``), or ``(key_length, query_slots) -> bias`` for a bias the layer computes."""
        if self.source == "mask":
            return None
        if self.source == "keyword":
            return value
        if self.columns is None:  # a layer without a bias of its own (GPT-J up to 5.23)
            return None
        return functools.partial(self.columns, module, value)

    def check_mask(self, mask: torch.Tensor | None, where: str) -> None:
        """Refuse a mask that cannot carry the bias this route relies on it to carry (a no-op for other sources).

        Why: a release that stops folding the bias into the mask would otherwise be served without it, silently.
        """
        if self.source != "mask" or torch.compiler.is_compiling():
            return
        if mask is None or mask.dtype == torch.bool or mask.dim() != 4:
            kind = "no mask" if mask is None else f"a {mask.dtype} mask of {mask.dim()} dimensions"
            raise TransformersContractError(
                f"{where}: hf_slim serves this layer with the score bias (ALiBi) in its attention mask, as this "
                f"model's transformers code builds it, but the layer got {kind}: this transformers release changed "
                "how the bias reaches attention; call hf_slim.unslimify(model), or install a tested transformers"
            )

    def keyword_arguments(self, value: torch.Tensor | None, key_length: int) -> dict:
        """The keyword the model's own attention function takes the bias as, cut to the ``key_length`` keys it
        attends over (a static cache's prefill attends over the written slots of a bias that spans every slot)."""
        if self.source != "keyword" or value is None:
            return {}
        return {self.name: value[..., :key_length]}

    def eager(
        self, module: torch.nn.Module, value: object = None, *, scale: float, upcast: bool, dropout: float
    ) -> Callable:
        """The model's eager attention for a layer that adds its bias itself, as a ``run_attention(query, key, value,
        mask)`` for :func:`hf_slim.attention.slim_self_attention`: :func:`biased_eager_attention` with the same
        :attr:`columns` the slim decode adds, for the keys the call attends over (the new tokens are the last ``new``
        of them, as in every prefill or chunk the slim path runs)."""

        def run(query: torch.Tensor, key: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
            keys, new = key.shape[-2], query.shape[-2]
            bias = None
            if self.columns is not None:
                bias = self.columns(module, value, keys, torch.arange(keys - new, keys, device=query.device))
            training = module.training
            return biased_eager_attention(
                query, key, values, mask, scale=scale, bias=bias, upcast=upcast, dropout=dropout if training else 0.0
            )

        return run


# Adapted from transformers 5.23.0, models/mpt/modeling_mpt.py, MptAttention.forward (scores to context): BLOOM's
# BloomAttention.forward, GPT-Neo's GPTNeoSelfAttention._attn and GPT-J's GPTJAttention._attn (up to 5.23) are the same
# arithmetic (BLOOM fuses the bias into one baddbmm, GPT-Neo applies its window with torch.where: equal up to rounding).
def biased_eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    upcast: bool = False,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale + bias + mask)`` in float32, cast to the value dtype: the eager attention of the families
    that add a score bias themselves. ``query: (b, h, t, dk)``, ``key, value: (b, h, n, dk)``, ``bias: (b|1, h|1, t|1,
    n)`` float, ``mask``: bool (True: attended) or additive float; ``upcast``: scores in float32 (GPT-Neo, GPT-J).
    Returns ``(b, t, h, dk)`` and the probabilities ``(b, h, t, n)``."""
    if upcast:
        query, key = query.float(), key.float()
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (b, h, t, n)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = torch.nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
    dropped = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0.0)
    return torch.matmul(dropped, value).transpose(1, 2), probs  # (b, t, h, dk)
