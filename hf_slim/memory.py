"""Cache memory arithmetic: bytes of a vanilla transformers cache vs a slim cache, per layer, for a given shape.

Computed from the model's attention layer shapes only, so it works on a model built on the meta device (e.g. the
full T5-11B config without allocating it). The measured counterpart is :func:`hf_slim.cache.cache_nbytes` on the
cache objects generate() returns; tests check that the two agree.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedConfig

from .interface import check_model_implementation
from .record import LAYER_MODES, is_slim, slim_record
from .registry import SUPPORTED, architecture_for
from .rope import RotarySource

if TYPE_CHECKING:
    from .toolkit import ArchitecturePatch


@dataclass
class LayerBytes:
    """One attention layer's cache bytes for the reported shape."""

    name: str
    mode: str
    vanilla: int
    slim: int


@dataclass
class CacheReport:
    """Vanilla vs slim cache bytes for ``batch_size`` sequences of ``seq_len`` tokens (``num_beams`` each).

    ``encoder_bytes`` is the encoder output (``batch * num_beams, encoder_len, d_model``) that encoder-decoder
    generation holds next to the vanilla cache (transformers repeats it per beam); the slim model keeps one copy per
    input (``slim_encoder_bytes``). ``*_with_encoder`` totals count each side's own.
    ``rotary_bytes`` is what a RoPE K cache keeps once for all layers to un-rotate its keys (:mod:`hf_slim.rope`),
    counted in the slim total, and ``rotary_stored`` says what that is: ``"positions"`` (one int32 per token),
    ``"positions + regimes"`` (dynamic NTK, longrope: an int32 regime id per token beside it, and each regime's
    float32 ``inv_freq``, at most as many as the cache can register for ``seq_len`` tokens) or ``"cos/sin table"``
    (``2 * rotary_dim`` numbers per token, where cos/sin cannot be recomputed from positions).
    """

    model_type: str
    batch_size: int
    seq_len: int
    encoder_len: int
    dtype: torch.dtype
    layers: list[LayerBytes] = field(default_factory=list)
    encoder_bytes: int = 0
    num_beams: int = 1
    rotary_bytes: int = 0
    rotary_stored: str = ""

    @property
    def slim_encoder_bytes(self) -> int:
        return self.encoder_bytes // self.num_beams

    @property
    def vanilla_bytes(self) -> int:
        return sum(layer.vanilla for layer in self.layers)

    @property
    def slim_bytes(self) -> int:
        return sum(layer.slim for layer in self.layers) + self.rotary_bytes

    @property
    def layers_ratio(self) -> float:
        """Vanilla / slim bytes of the attention layers alone (2.0 exactly when every layer keeps one tensor of the
        width of K): the ratio without the shared rotary positions."""
        return self.vanilla_bytes / max(sum(layer.slim for layer in self.layers), 1)

    @property
    def ratio(self) -> float:
        return self.vanilla_bytes / max(self.slim_bytes, 1)

    @property
    def ratio_with_encoder(self) -> float:
        return (self.vanilla_bytes + self.encoder_bytes) / max(self.slim_bytes + self.slim_encoder_bytes, 1)

    def __str__(self) -> str:
        lines = [
            f"{self.model_type}: batch {self.batch_size}, {self.seq_len} tokens"
            + (f", {self.num_beams} beams" if self.num_beams > 1 else "")
            + (f", {self.encoder_len} encoder frames" if self.encoder_len else "")
            + f", {str(self.dtype).removeprefix('torch.')}",
            f"{'layer':<34} {'mode':<8} {'vanilla':>12} {'slim':>12}",
        ]
        size = format_bytes
        lines += [f"{r.name:<34} {r.mode:<8} {size(r.vanilla):>12} {size(r.slim):>12}" for r in self.layers]
        if self.rotary_bytes:
            label = f"rotary {self.rotary_stored} (all layers)"
            lines.append(f"{label:<43} {'':>12} {size(self.rotary_bytes):>12}")
            lines.append(f"{'layers only':<43} {'':>12} {'':>12}  {self.layers_ratio:.2f}x")
        lines.append(f"{'total':<43} {size(self.vanilla_bytes):>12} {size(self.slim_bytes):>12}  {self.ratio:.2f}x")
        if self.encoder_bytes:
            lines.append(
                f"{'total incl. encoder output':<43} {size(self.vanilla_bytes + self.encoder_bytes):>12} "
                f"{size(self.slim_bytes + self.slim_encoder_bytes):>12}  {self.ratio_with_encoder:.2f}x"
            )
        return "\n".join(lines)


def rotary_dim(model: torch.nn.Module, patch: ArchitecturePatch) -> int:
    """Width of the cos/sin a RoPE model hands its attention: the patch's ``rotary_dim(model)`` if it has one, else
    twice the length of the model's rotary ``inv_freq`` buffer (shapes only: works on the meta device)."""
    if patch.rotary_dim is not None:
        return patch.rotary_dim(model)
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return 2 * inv_freq.numel()
    raise ValueError(f"found no rotary embedding (inv_freq) in {type(model).__name__}")


def rotary_bytes(
    model: torch.nn.Module, patch: ArchitecturePatch, source: RotarySource | None, rows: int, seq_len: int, size: int
) -> tuple[str, int]:
    """What a slim cache of ``rows`` x ``seq_len`` tokens keeps to un-rotate RoPE keys, and its bytes, as
    :class:`hf_slim.rotary_positions.RotaryPositions` holds it: int32 positions (and regime ids), the regimes' float32
    ``inv_freq`` in a buffer grown by doubling (power-of-two rows), or the cos/sin table (``size``-byte numbers)."""
    if source is None:
        return "cos/sin table", rows * seq_len * 2 * rotary_dim(model, patch) * size
    regimes = source.max_regimes(seq_len)
    capacity = 1 << (regimes - 1).bit_length() if regimes else 0
    regime_bytes = capacity * (source.rotary_dim // 2) * 4
    if source.position_pure:
        return "positions", rows * seq_len * 4 + regime_bytes
    return "positions + regimes", rows * seq_len * 2 * 4 + regime_bytes


def format_bytes(nbytes: float, digits: int = 1) -> str:
    """``1536 -> '1.5 KiB'``: binary units up to GiB, whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.{digits}f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def cache_report(
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype | None = None,
    *,
    encoder_len: int | None = None,
    num_beams: int = 1,
    verbose: bool = True,
) -> CacheReport:
    """Bytes a vanilla cache and the slim cache need for ``batch_size`` x ``seq_len`` tokens, per layer and total.

    Parameters
    ----------
    model:
        a supported model, slimified or not (not: the report assumes ``slimify(model)`` defaults), possibly on meta.
    batch_size, seq_len:
        cache shape (decoder tokens).
    dtype:
        cache dtype; defaults to the model's parameter dtype.
    encoder_len:
        encoder frames/tokens for encoder-decoder models (defaults to Whisper's 1500 frames or ``seq_len``).
    num_beams:
        beams per sequence: every cache row is repeated per beam; the encoder output is too for the vanilla model,
        while the slim model keeps one copy per input
        (:func:`hf_slim.generation.expand_inputs_keeping_encoder_output`).
    verbose:
        print the table.

    Raises
    ------
    UnsupportedModelError
        for a model that is not slimified and that ``slimify`` would refuse (GQA/MQA, unsupported architectures or
        attention implementations): the same error, never a saving slimify will not deliver.
    ValueError
        a batch size or length below 1 (the table would show zero or negative bytes), an ``encoder_len`` for a model
        without an encoder, or a model with no supported attention layers.
    """
    model_type = model.config.model_type
    if not is_slim(model):  # the report assumes slimify(model): refuse where slimify would (it raises the same error)
        architecture_for(model.config, "auto")
        check_model_implementation(model)
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("encoder_len", encoder_len),
        ("num_beams", num_beams),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"cache_report: {name} must be a positive integer, got {value!r}")
    if encoder_len is not None and not model.config.is_encoder_decoder:
        raise ValueError(f"cache_report: encoder_len is for encoder-decoder models; {model_type} has no encoder")
    patch = SUPPORTED[model_type].load() if model_type in SUPPORTED else None
    sites = patch.attention_sites(model) if patch is not None else []
    if not sites:
        raise ValueError(f"no supported attention layers in {type(model).__name__} ({model_type!r})")
    dtype = dtype or next(model.parameters()).dtype
    size = dtype.itemsize  # bytes per element (no tensor: nothing lands on the default device)
    if encoder_len is None:
        encoder_len = getattr(model.config, "max_source_positions", seq_len) if model.config.is_encoder_decoder else 0
    modes = slim_record(model).layer_modes if is_slim(model) else {}
    ranks = slim_record(model).residual_ranks if is_slim(model) else {}  # K+R layers cache e + r (+ 1) per token
    report = CacheReport(model_type, batch_size, seq_len, encoder_len, dtype, num_beams=num_beams)
    rows = batch_size * num_beams
    self_default = "k" if SUPPORTED[model_type].positions == "rope" else "input"  # what slimify(model) would pick
    d_model = None
    for site in sites:
        projections = site.projections(site.module)
        d_in, inner = projections.w_k.shape
        d_model = d_in
        default = "kv" if site.k_mode_refusal else self_default
        mode = modes.get(site.name, "encoder" if site.kind == "cross" else default)
        if site.kind == "cross":
            vanilla, slim = 2 * rows * encoder_len * inner, 0
        else:
            vanilla = 2 * rows * seq_len * inner
            key_scale = projections.key_norm is not None  # K layers of normalised keys keep each token's scale
            k_width = inner + ranks.get(site.name, 0) + key_scale
            slim = rows * seq_len * {"k": k_width, "kv": 2 * inner}.get(mode, d_in)
        report.layers.append(LayerBytes(site.name, mode, vanilla * size, slim * size))
    rotary = [site for site, layer in zip(sites, report.layers, strict=True) if site.rotary and layer.mode == "k"]
    if rotary:
        source = rotary[0].rotary_source  # the leading K layer's: the cache follows it
        report.rotary_stored, report.rotary_bytes = rotary_bytes(model, patch, source, rows, seq_len, size)
    if model.config.is_encoder_decoder:
        report.encoder_bytes = rows * encoder_len * d_model * size
    if verbose:
        print(report)
    return report


#: How :func:`slim_summary` names each layer mode.
_MODE_NAMES = {
    "k": "K+R",
    "input": "input (X)",
    "kv": "their own K/V (no exact K+R)",
    "encoder": "cross-attention (reads the encoder output, no cache)",
}

#: Config attributes giving a model's maximum length (decoder positions), first match wins.
_MAX_LENGTHS = ("max_target_positions", "n_positions", "max_position_embeddings", "max_sequence_length", "seq_length")


def summary_length(config) -> int:
    """The decoder length :func:`slim_summary` reports the cache ratio at: the model's maximum (its position table or
    ``max_position_embeddings``), 512 for models without one (T5's relative positions)."""
    decoder = getattr(config, "decoder", None)
    config = decoder if isinstance(decoder, PreTrainedConfig) else config  # composites: the decoder's positions
    return next((value for name in _MAX_LENGTHS if isinstance(value := getattr(config, name, None), int)), 512)


def slim_summary(model: torch.nn.Module, *, brief: bool = False) -> str:
    """One line saying what ``slimify`` gave a model: its layers per mode, the K+R residual ranks, and the cache
    ratio against the unmodified model's K/V cache at :func:`summary_length` tokens, batch 1 (with the encoder output
    both keep, for encoder-decoders), e.g. ``hf_slim: 32 layers K+R (r 0-384); cache 1.86x smaller than K/V at 4096
    tokens``. ``brief=True``: the layer count per mode alone, e.g. ``slim layers: 30 input, 2 k`` (what
    ``hf-slim export`` prints; no cache arithmetic)."""
    record = slim_record(model)
    if brief:
        modes = list(record.layer_modes.values())
        return "slim layers: " + ", ".join(f"{modes.count(mode)} {mode}" for mode in LAYER_MODES if mode in modes)
    parts = []
    for mode, label in _MODE_NAMES.items():
        names = [name for name, layer_mode in record.layer_modes.items() if layer_mode == mode]
        if not names:
            continue
        part = f"{len(names)} layer{'s' if len(names) > 1 else ''} {label}"
        if mode == "k":
            ranks = sorted(record.residual_ranks.get(name, 0) for name in names)
            part += f" (r {ranks[0]})" if ranks[0] == ranks[-1] else f" (r {ranks[0]}-{ranks[-1]})"
        parts.append(part)
    length = summary_length(model.config)
    try:
        report = cache_report(model, 1, length, verbose=False)
    except ValueError as error:  # e.g. a DoRA adapter, refused at the first forward: say so, do not fail slimify
        return f"hf_slim: {', '.join(parts)}; cache size not computed: {str(error).splitlines()[0]}"
    ratio, encoder = report.ratio, ""
    if report.encoder_bytes:  # generate keeps the encoder output beside either cache: count it on both sides
        ratio, encoder = report.ratio_with_encoder, ", counting the encoder output"
    return f"hf_slim: {', '.join(parts)}; cache {ratio:.2f}x smaller than K/V at {length} tokens{encoder}"
