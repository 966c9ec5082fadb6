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

What the cache keeps for that (:class:`hf_slim.rotary_positions.RotaryPositions`, once for all layers), and why:

* **the position id** each token was rotated at, int32 ``(batch, seq)``: 4 bytes per token against ``2 * layers * e``
  numbers for K/V (Llama-2-7B: 4 B vs 512 KiB), so the cache is 2.00x smaller than transformers' (the cos/sin table it
  used to keep, ``2 * rotary_dim`` numbers per token, cost 0.2%);
* for the **history-dependent** rope types only (dynamic NTK: frequencies depend on the length when written;
  longrope: short vs long factors; any type not known to be position-pure), the **regime** each token was written
  with: a per-cache list of the distinct ``(inv_freq, attention_scaling)`` sets registered as they appear, plus an
  int32 regime id per token (Phi-3 longrope: two regimes; dynamic NTK past its original context: one per step);
* cos/sin are recomputed on read from those, exactly as the model computed them (:func:`frequency_table`: the
  rotary module's float32 ``position * inv_freq``, ``cat``, ``cos``/``sin``, ``* attention_scaling``, cast; GPT-J:
  rows of its own ``embed_positions`` buffer, :func:`sinusoid_table`), once per step for all layers (the working
  table is dropped at the end of the step, never kept between steps).

Never silently wrong: on every eager write the leading layer checks that the recomputed rows of the new tokens equal
(``torch.equal``) the cos/sin the model handed its attention. If they do not (a rotary implementation this recompute
does not mirror, custom ``position_embeddings``, no ``position_ids``), that cache falls back to storing the cos/sin
table as handed (earlier rows, verified when written, are recomputed into it) and warns once
(:class:`RotaryFallbackWarning`): it stays exact and only loses the 0.2%. Falling back rather than raising keeps
working models working (custom position embeddings are legitimate in transformers) while the warning makes the
memory cost visible. Inside a ``torch.compile`` trace the check is left out (it is a data-dependent branch); a static
cache's prefill runs eagerly and is checked.

Un-rotation is the exact inverse of the 2x2 map each column pair went through: with ``c, s`` the cos/sin
(``attention_scaling`` of YaRN/longrope included), ``x = y c' - rot(y) s'`` with ``c' = c / (c^2 + s^2)`` and
``s' = s / (c^2 + s^2)`` prepared once per step (:class:`Unrotation`), in float32, four elementwise passes per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

#: Rotation layouts: ``"half"`` pairs column ``i`` with ``i + rotary_dim / 2`` (``rotate_half``: Llama, NeoX, Phi);
#: ``"interleaved"`` pairs ``2i`` with ``2i + 1`` (``rotate_every_two``: GPT-J).
ROTARY_STYLES = ("half", "interleaved")

#: transformers ``rope_type`` s whose cos/sin are a function of the position alone (fixed frequencies): their
#: cache keeps positions only. Any other type is treated as history-dependent (frequencies tracked per regime).
POSITION_PURE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryFallbackWarning(UserWarning):
    """A slim cache could not reproduce the cos/sin the model handed its attention from positions, and keeps the
    cos/sin table instead (exact, ``2 * rotary_dim`` numbers per token more)."""


@dataclass(frozen=True)
class RotaryLayout:
    """How a layer rotates its keys: the pairing style; the rotated columns are the first ``rotary_dim`` of each head,
    where ``rotary_dim`` is the width of the cos/sin the model hands its attention (read from the table's width)."""

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
    one row per new token (what :meth:`hf_slim.cache.SlimCache.update_rotary` checks the recomputed rows against)."""
    table = torch.cat((cos, sin), dim=-1)  # (b|1, t, 2r)
    return table.expand(batch, *table.shape[1:])


@dataclass(frozen=True)
class Unrotation:
    """The inverse rotation of one step's cached keys, prepared once for every K-mode layer of the step.

    ``cos``, ``sin``: ``(batch, n, 1, rotary_dim)`` float32, the cos | sin each position was rotated with, divided by
    ``c^2 + s^2`` (``attention_scaling^2``; where it is 0, a static table's unwritten rows, by 1). Why prepared: the
    division, the casts, the broadcast shape and the column pairs are per position, not per layer, so every layer of
    the step then un-rotates its keys in four elementwise passes (:func:`unrotate_keys`).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    _pairs: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, table: torch.Tensor) -> Unrotation:
        """``table: (batch, n, 2 * rotary_dim)``, cos | sin in the model dtype, as the model handed them."""
        rotary_dim = table.shape[-1] // 2
        cos = table[..., None, :rotary_dim].float()  # (b, n, 1, r)
        sin = table[..., None, rotary_dim:].float()  # (b, n, 1, r)
        scale = cos * cos + sin * sin  # attention_scaling^2; 0 only in a static table's unwritten rows
        inverse = torch.where(scale > 0, scale, 1.0).reciprocal_()
        return cls(cos * inverse, sin * inverse)

    @property
    def rotary_dim(self) -> int:
        return self.cos.shape[-1]

    def pairs(self, style: str, seq: int) -> tuple[slice, slice, tuple[torch.Tensor, ...]]:
        """The column slices of each pair's first and second member for ``style``, and ``(c'1, s'1, c'2, s'2)``,
        each ``(batch, seq, 1, rotary_dim / 2)``: computed once per step and layout, reused by every layer."""
        key = (style, seq)
        if key not in self._pairs:
            rotary_dim = self.rotary_dim
            if style == "half":
                first, second = slice(0, rotary_dim // 2), slice(rotary_dim // 2, rotary_dim)
            else:
                first, second = slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)
            cos, sin = self.cos[:, :seq], self.sin[:, :seq]  # (b|1, n, 1, r)
            self._pairs[key] = (first, second, (cos[..., first], sin[..., first], cos[..., second], sin[..., second]))
        return self._pairs[key]


def unrotate_keys(
    keys: torch.Tensor, unrotation: Unrotation, num_heads: int, head_dim: int, layout: RotaryLayout
) -> torch.Tensor:
    """Undo RoPE on cached keys, exactly as the model applied it: ``(batch, seq, width)`` -> same, float32.

    The model rotated each column pair ``(x1, x2)`` to ``(x1 c - x2 s, x2 c + x1 s)``; the inverse is ``x1 = y1 c' +
    y2 s'``, ``x2 = y2 c' - y1 s'`` with ``c' = c / (c^2 + s^2)``, ``s' = s / (c^2 + s^2)`` (:class:`Unrotation`).
    Written as four elementwise passes straight into the float32 output (no rotated copy, no temporaries the size of
    the cache): what the decode step and the K-mode calibration both run.

    Parameters
    ----------
    keys:
        ``(batch, seq, width)`` rotated keys in the first ``e = heads * head_dim`` columns; columns after them (a K+R
        residual, a key scale) pass through untouched.
    unrotation:
        the step's :class:`Unrotation` for at least ``seq`` positions.
    num_heads, head_dim:
        head layout of the key columns; the first ``rotary_dim`` columns of each head are rotated, the rest pass
        through.
    layout:
        the pairing style: ``"half"`` pairs column ``i`` with ``i + rotary_dim / 2``, ``"interleaved"`` ``2i`` with
        ``2i + 1``.
    """
    batch, seq, width = keys.shape
    key_width = num_heads * head_dim
    rotary_dim = unrotation.rotary_dim
    first, second, (cos1, sin1, cos2, sin2) = unrotation.pairs(layout.style, seq)  # (b|1, n, 1, r/2) each
    rotated = keys[..., :key_width].unflatten(-1, (num_heads, head_dim))  # (b, n, h, dk), a view
    y1, y2 = rotated[..., first], rotated[..., second]
    if torch.compiler.is_compiling():  # no strided out= under dynamo: the same arithmetic, which inductor fuses
        x1, x2 = y1 * cos1 + y2 * sin1, y2 * cos2 - y1 * sin2  # (b, n, h, r/2) each
        pairs = torch.cat((x1, x2), dim=-1) if layout.style == "half" else torch.stack((x1, x2), dim=-1).flatten(-2)
        plain = torch.cat((pairs, rotated[..., rotary_dim:].float()), dim=-1).flatten(-2)  # (b, n, e)
        return torch.cat((plain, keys[..., key_width:].float()), dim=-1)  # (b, n, w)
    out = torch.empty((batch, seq, width), dtype=torch.float32, device=keys.device)  # (b, n, w)
    plain = out[..., :key_width].unflatten(-1, (num_heads, head_dim))  # (b, n, h, dk), a view of out
    x1, x2 = plain[..., first], plain[..., second]
    torch.mul(y1, cos1, out=x1)
    x1.addcmul_(y2, sin1)  # x1 = y1 c' + y2 s'
    torch.mul(y2, cos2, out=x2)
    x2.addcmul_(y1, sin2, value=-1)  # x2 = y2 c' - y1 s'
    if rotary_dim < head_dim:  # partial rotary: the rest of each head passes through
        plain[..., rotary_dim:] = rotated[..., rotary_dim:]
    if key_width < width:  # K+R residual, key scale
        out[..., key_width:] = keys[..., key_width:]
    return out


def frequency_table(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float | torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The cos | sin a transformers rotary module (Llama's ``LlamaRotaryEmbedding.forward`` and its copies) hands the
    attention, recomputed: ``(batch, seq, 2 * rotary_dim)`` in ``dtype``.

    Mirrors the module's forward step by step (float32 ``position * inv_freq``, ``cat((freqs, freqs))``, ``cos`` /
    ``sin``, ``* attention_scaling``, cast), so the rows are bit for bit the module's: every step is an elementwise
    float32 operation whose result does not depend on the batch or the other positions.

    Parameters
    ----------
    positions:
        ``(batch, seq)`` integer position ids.
    inv_freq:
        ``(rotary_dim / 2,)`` float32, or ``(batch, seq, rotary_dim / 2)``: each token's own frequencies.
    scaling:
        ``attention_scaling`` as the module holds it (a Python float), or ``(batch, seq, 1)`` float32 per token.
    """
    freqs = positions[..., None].float() * inv_freq  # (b, n, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, n, r)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling  # (b, n, r) each
    return torch.cat((cos.to(dtype), sin.to(dtype)), dim=-1)  # (b, n, 2r)


def sinusoid_table(embed_positions: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """GPT-J's cos | sin: rows of its fixed ``embed_positions: (max_positions, rotary_dim)`` buffer (``sin | cos``),
    cast as its forward casts them, each entry repeated for its column pair (``rotate_every_two`` layout):
    ``positions: (batch, seq)`` -> ``(batch, seq, 2 * rotary_dim)``. A gather: exact by construction."""
    sincos = embed_positions.to(positions.device)[positions.long()].to(dtype)  # (b, n, r)
    sin, cos = sincos.chunk(2, dim=-1)  # (b, n, r/2) each
    return torch.cat((cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)), dim=-1)  # (b, n, 2r)


class RotaryFrequencies:
    """Where a Llama-style RoPE model's cos/sin come from: its rotary embedding module (``inv_freq``,
    ``attention_scaling``, ``rope_type``), shared by all layers (Llama, Qwen2, OLMo, Phi, Phi-3, StableLM, GPT-NeoX).

    Holds the module, not copies: dynamic NTK replaces ``inv_freq`` and longrope rewrites it as sequences grow, so
    :meth:`frequencies` reads the frequencies the module used for the forward running now.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @property
    def position_pure(self) -> bool:
        """Whether cos/sin depend on the position alone (:data:`POSITION_PURE_ROPE_TYPES`)."""
        return getattr(self.module, "rope_type", None) in POSITION_PURE_ROPE_TYPES

    def frequencies(self) -> tuple[torch.Tensor, float]:
        """The module's current ``(inv_freq (rotary_dim / 2,), attention_scaling)``."""
        return self.module.inv_freq, float(self.module.attention_scaling)

    def table(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float | torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """:func:`frequency_table` with the given (recorded) frequencies."""
        return frequency_table(positions, inv_freq, scaling, dtype)

    def max_regimes(self, seq_len: int) -> int:
        """Upper bound of the regimes a cache of ``seq_len`` tokens registers (for :func:`hf_slim.cache_report`):
        1 for position-pure types, 2 for longrope (short, long factors), and for dynamic NTK (or an unknown type) one
        more per step past the original context (the frequencies grow with every longer sequence)."""
        if self.position_pure:
            return 1
        if getattr(self.module, "rope_type", None) == "longrope":
            return 2
        original = getattr(self.module, "original_max_seq_len", 0)
        return 1 + max(0, seq_len - original)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.module.inv_freq.numel()


class SinusoidPositions:
    """Where GPT-J's cos/sin come from: the attention module's own fixed ``embed_positions`` buffer (position-pure,
    no frequencies to record)."""

    position_pure = True

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def frequencies(self) -> None:
        return None

    def table(self, positions: torch.Tensor, inv_freq, scaling, dtype: torch.dtype) -> torch.Tensor:
        """:func:`sinusoid_table` of the module's buffer (``inv_freq``, ``scaling``: unused)."""
        return sinusoid_table(self.module.embed_positions, positions, dtype)

    def max_regimes(self, seq_len: int) -> int:
        return 0

    @property
    def rotary_dim(self) -> int:
        return self.module.embed_positions.shape[-1]


#: What a K-mode RoPE layer recomputes its cos/sin with.
RotarySource = RotaryFrequencies | SinusoidPositions


def sinusoid_columns(position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(sin, cos)`` a GPT-J-style rotary module hands each layer (``(batch, new, rotary_dim / 2)`` each: GPT-J
    from 5.24, CodeGen) as the ``(cos, sin)`` each rotated column was multiplied by, ``(batch, new, rotary_dim)``
    each: ``apply_rotary_pos_emb`` repeats every entry for its interleaved pair (an ``AttentionRoute.rotary_columns``).
    """
    sin, cos = position_embeddings
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)  # (b, t, r) each


def interleaved_columns(position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` a Llama-style rotary module hands each layer (``cat(freqs, freqs)``, ``(batch, new,
    rotary_dim)`` each) as the ``(cos, sin)`` each rotated column is multiplied by in a layer that rotates interleaved
    pairs (Moonshine): its ``apply_rotary_pos_emb`` keeps the first half and repeats every entry for its pair (an
    ``AttentionRoute.rotary_columns``)."""
    cos, sin = position_embeddings
    half = cos.shape[-1] // 2
    return cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)  # (b, t, r)


class InterleavedFrequencies(RotaryFrequencies):
    """:class:`RotaryFrequencies` of a rotary module whose cos/sin the layers turn into interleaved columns
    (:func:`interleaved_columns`, Moonshine): the recomputed table is in the columns the keys were rotated with."""

    def table(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float | torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """:func:`frequency_table` rearranged by :func:`interleaved_columns`: ``(batch, seq, 2 * rotary_dim)``."""
        cos, sin = frequency_table(positions, inv_freq, scaling, dtype).chunk(2, dim=-1)  # (b, n, r) each
        return torch.cat(interleaved_columns((cos, sin)), dim=-1)  # (b, n, 2r)


def shared_sinusoid_positions(model: torch.nn.Module, attention: tuple[type, ...]) -> SinusoidPositions | None:
    """:class:`SinusoidPositions` of the model's one module holding a fixed ``embed_positions`` table outside its
    ``attention`` classes (GPT-J's and CodeGen's model-level rotary module), or None when there is none or several
    (then the cache keeps the cos/sin table: exact, 0.2% larger)."""
    tables = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "embed_positions", None), torch.Tensor) and type(module) not in attention
    ]
    return SinusoidPositions(tables[0]) if len(tables) == 1 else None


def find_rotary_frequencies(model: torch.nn.Module) -> RotaryFrequencies | None:
    """The model's one rotary embedding module (a module holding ``inv_freq`` and ``attention_scaling``), or None
    when there is none or several (then the cache keeps the cos/sin table: exact, 0.2% larger)."""
    found = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "attention_scaling")
    ]
    return RotaryFrequencies(found[0]) if len(found) == 1 else None


@contextlib.contextmanager
def rotary_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run forwards that leave no trace in the model's rotary modules.

    Why: dynamic NTK and longrope update their frequencies as a side effect of every forward (dynamic NTK keeps the
    frequencies of the longest sequence seen, ``max_seq_len_cached``, until a forward shorter than the original
    context resets them). slimify's calibration pass would otherwise leave the slim model starting from other
    frequencies than the unpatched one: a 40-token prefill after a 64-token calibration (context 32) would rotate
    with the 64-token frequencies. Buffers are restored in place (same tensors, same addresses), plain attributes
    are put back and attributes the forward added (longrope's ``long_inv_freq``) are removed.
    """
    saved = []
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            buffers = {name: (tensor, tensor.clone()) for name, tensor in module._buffers.items() if tensor is not None}
            attributes = {name: value for name, value in vars(module).items() if not name.startswith("_")}
            saved.append((module, buffers, attributes))
    try:
        yield
    finally:
        for module, buffers, attributes in saved:
            for name, (tensor, values) in buffers.items():
                tensor.copy_(values)
                module._buffers[name] = tensor
            for name in [name for name in vars(module) if not name.startswith("_") and name not in attributes]:
                delattr(module, name)
            for name, value in attributes.items():
                setattr(module, name, value)
