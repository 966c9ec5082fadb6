"""RoPE models through the K cache: cache the keys as the model rotated them, un-rotate them for the values.

Why the K side: RoPE rotates keys between the projection and the dot product, so the input cache (which absorbs the
query into the input space) cannot serve RoPE models. Values are a linear function of the *unrotated* keys,
``V = K W_KV + offset`` (:mod:`hf_slim.kmode`), while scores need the *rotated* ones.

Where the rotation sits (the choice, and why): the cache holds the **rotated** keys, exactly the tensor transformers'
own cache holds, and the values un-rotate them:

* scores read the cache as vanilla decode does (bit for bit the same keys), so every scaling type (linear, dynamic
  NTK, YaRN, longrope, llama3) and every layout (partial, interleaved) is whatever the model's own rotary module and
  ``apply_rotary_pos_emb`` did when the keys were written: nothing to re-implement for the scores;
* values need ``K_j = R_j^-1 Krot_j`` for each cached position ``j``, with the ``cos``/``sin`` that rotated it.
  With dynamic NTK and longrope the frequencies change as the sequence grows (the factor switch), and the vanilla
  cache keeps old keys rotated with the *old* frequencies; recomputing cos/sin from positions with today's
  frequencies would not match it. So the slim cache keeps the cos/sin each position was written with, once for all
  layers (:attr:`hf_slim.cache.SlimCache.rotary`, ``2 * rotary_dim`` numbers per token against ``layers * e`` for
  the keys: 0.2% for Llama-2-7B).

Un-rotation is the exact inverse of the 2x2 map each column pair went through: with ``c, s`` the stored cos/sin
(``attention_scaling`` of YaRN/longrope included), ``x = (y c - rot(y) s) / (c^2 + s^2)``, computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Rotation layouts: ``"half"`` pairs column ``i`` with ``i + rotary_dim / 2`` (``rotate_half``: Llama, NeoX, Phi);
#: ``"interleaved"`` pairs ``2i`` with ``2i + 1`` (``rotate_every_two``: GPT-J).
ROTARY_STYLES = ("half", "interleaved")


@dataclass(frozen=True)
class RotaryLayout:
    """How a layer rotates its keys: the pairing style; the rotated columns are the first ``rotary_dim`` of each head,
    where ``rotary_dim`` is the width of the cos/sin the model hands its attention (read from the cache's table)."""

    style: str = "half"

    def __post_init__(self) -> None:
        if self.style not in ROTARY_STYLES:
            raise ValueError(f"rotary style must be one of {ROTARY_STYLES}, got {self.style!r}")


def rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    """The model's ``rotate_half`` / ``rotate_every_two`` on the last axis (a 90-degree turn of each column pair)."""
    if style == "half":
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)
    even, odd = x[..., ::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def cos_sin_table(cos: torch.Tensor, sin: torch.Tensor, batch: int) -> torch.Tensor:
    """``cos, sin: (batch|1, new, rotary_dim)`` as the model hands them to attention -> ``(batch, new, 2*rotary_dim)``,
    one row per cached token (what :meth:`hf_slim.cache.SlimCache.update_rotary` stores)."""
    table = torch.cat((cos, sin), dim=-1)  # (b|1, t, 2r)
    return table.expand(batch, *table.shape[1:])


def unrotate_keys(
    keys: torch.Tensor, table: torch.Tensor, num_heads: int, head_dim: int, layout: RotaryLayout
) -> torch.Tensor:
    """Undo RoPE on cached keys, exactly as the model applied it: ``(batch, seq, heads * head_dim)`` -> same, float32.

    Parameters
    ----------
    keys:
        ``(batch, seq, e)`` rotated keys (or a K cache carrying extra columns after the ``e`` key columns, which pass
        through untouched).
    table:
        ``(batch, >= seq, 2 * rotary_dim)``, the cos | sin each position was rotated with.
    num_heads, head_dim:
        head layout of the key columns; the first ``rotary_dim`` columns of each head are rotated, the rest pass
        through.
    layout:
        the pairing style.
    """
    batch, seq, width = keys.shape
    rotary_dim = table.shape[-1] // 2
    cos = table[:, :seq, None, :rotary_dim].float()  # (b, n, 1, r)
    sin = table[:, :seq, None, rotary_dim:].float()  # (b, n, 1, r)
    key_width = num_heads * head_dim
    rotated = keys[..., :key_width].float().reshape(batch, seq, num_heads, head_dim)  # (b, n, h, dk)
    turned, passed = rotated[..., :rotary_dim], rotated[..., rotary_dim:]
    scale = cos * cos + sin * sin  # (b, n, 1, r): attention_scaling^2; 0 only in a static table's unwritten rows
    plain = (turned * cos - rotate(turned, layout.style) * sin) / torch.where(scale > 0, scale, 1.0)  # (b, n, h, r)
    out = torch.cat((plain, passed), dim=-1).reshape(batch, seq, key_width)  # (b, n, e)
    if key_width < width:
        out = torch.cat((out, keys[..., key_width:].float()), dim=-1)  # (b, n, e + extra)
    return out
