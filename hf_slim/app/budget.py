"""Memory planning for bulk jobs: the peak bytes of one batch, slim or unpatched, and the largest batch in a budget.

Why: the slim cache is what lets a bulk job run a larger batch in the same memory. Picking that batch needs the cache
bytes (:func:`hf_slim.memory.cache_report`, the same arithmetic ``hf-slim memory`` prints, used here as is) plus what
the cache sits beside: the encoder output generate() holds, the activations of a decode step, and the encoder's own
activations. The encoder runs in micro-batches (:func:`encoder_micro_batches`) so that its activations, which do not
depend on the cache, never set the peak; without that, a Whisper encoder pass (about 7x a slim cache row per input)
would decide the batch for the slim and the unpatched model alike.

All terms are estimates from the config and the longest input, in the model dtype (logits in float32, as generate()
keeps them), upper bounds rather than exact: ``scripts/bench_bulk.py`` prints them next to the measured peak.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hf_slim.memory import cache_report, format_bytes

#: float32 score copies a decode step keeps per row and vocabulary entry (logits, processed scores, log-softmax, the
#: beam-search sum) beside the logits the model returns
SCORE_COPIES = 4
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"8GiB" -> 8589934592``, ``"500MB" -> 500000000``, ``"2g" -> 2000000000``; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8GiB, 512MiB or 2GB)")
    value = int(float(match[1]) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class BatchMemory:
    """Estimated peak bytes of one batch (``batch_size`` inputs, ``num_beams`` rows each) on one side.

    ``cache``: the KV cache at ``seq_len`` decoder tokens (:func:`hf_slim.memory.cache_report`, slim or vanilla);
    ``encoder_output``: what generate() holds of the encoder output (slim: one copy per input; unpatched: one per
    row, repeated per beam); ``decode_activations``: one decode step's transient tensors (logits and score copies,
    hidden states, attention scores, one layer's cache being grown by a copy); ``encoder_activations``: the
    transient tensors of one encoder micro-batch of ``encoder_batch`` inputs (for a decoder-only model: the prefill
    of the whole batch, which is not split).
    """

    slim: bool
    batch_size: int
    num_beams: int
    seq_len: int
    encoder_len: int
    encoder_batch: int
    cache: int
    encoder_output: int
    decode_activations: int
    encoder_activations: int
    #: encoder output of the whole batch while it is being encoded (one copy per input, on both sides)
    encoded_inputs: int

    @property
    def decode_phase(self) -> int:
        return self.cache + self.encoder_output + self.decode_activations

    @property
    def encode_phase(self) -> int:
        return self.encoded_inputs + self.encoder_activations

    @property
    def peak(self) -> int:
        return max(self.decode_phase, self.encode_phase)

    def describe(self) -> str:
        side = "slim" if self.slim else "unpatched"
        return (
            f"{side}: batch {self.batch_size}: {format_bytes(self.peak)} (cache {format_bytes(self.cache)}, encoder "
            f"output {format_bytes(self.encoder_output)}, decode step {format_bytes(self.decode_activations)}; "
            f"encoder in micro-batches of {self.encoder_batch}: {format_bytes(self.encode_phase)})"
        )


def _config_int(config, names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@dataclass(frozen=True)
class _Shape:
    """What the activation estimate reads from a config (decoder and encoder may differ, e.g. Whisper)."""

    d_model: int
    ffn: int
    encoder_ffn: int
    heads: int
    vocab: int
    eager: bool


def _shape(model: torch.nn.Module, d_model: int) -> _Shape:
    config = model.config
    decoder = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    ffn = _config_int(decoder, ("decoder_ffn_dim", "ffn_dim", "d_ff", "intermediate_size", "n_inner"), 4 * d_model)
    encoder_ffn = _config_int(config, ("encoder_ffn_dim", "d_ff", "ffn_dim", "intermediate_size"), ffn)
    heads = _config_int(
        decoder,
        ("decoder_attention_heads", "num_heads", "num_attention_heads", "n_head", "encoder_attention_heads"),
        1,
    )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    return _Shape(d_model, ffn, encoder_ffn, heads, decoder.vocab_size, implementation == "eager")


def batch_memory(
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    slim: bool,
    encoder_len: int | None = None,
    prompt_len: int = 1,
    num_beams: int = 1,
    encoder_batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> BatchMemory:
    """Estimated peak bytes of generate() over one batch, for the slim (``slim=True``) or the unpatched model.

    Parameters
    ----------
    model:
        a supported model, slimified or not, possibly on the meta device (shapes only).
    batch_size, num_beams:
        inputs per batch and beams per input (``batch_size * num_beams`` decoder rows).
    seq_len:
        decoder tokens the cache reaches (prompt plus new tokens; Whisper: at most 448).
    encoder_len:
        encoder frames/tokens of the longest input (Whisper: 1500 per 30 s window); None for decoder-only models.
    prompt_len:
        decoder tokens of the first forward (Whisper's start tokens; a decoder-only model's longest prompt).
    encoder_batch:
        inputs per encoder micro-batch; None picks the largest whose activations stay below the decode phase.
    dtype:
        cache and activation dtype (default: the model's).
    """
    dtype = dtype or next(model.parameters()).dtype
    size = dtype.itemsize  # bytes per element (no tensor: nothing lands on the default device)
    encoder_decoder = bool(model.config.is_encoder_decoder)
    report = cache_report(
        model, batch_size, seq_len, dtype, encoder_len=encoder_len if encoder_decoder else None,
        num_beams=num_beams, verbose=False,
    )  # fmt: skip
    cache = report.slim_bytes if slim else report.vanilla_bytes
    encoder_output = report.slim_encoder_bytes if slim else report.encoder_bytes
    d_model = _config_int(model.config.get_text_config(decoder=True), ("d_model", "hidden_size", "n_embd"), 1)
    self_layers = [layer.slim if slim else layer.vanilla for layer in report.layers if layer.mode != "encoder"]
    shape = _shape(model, d_model)
    rows = batch_size * num_beams
    source = report.encoder_len if encoder_decoder else 0
    # one decode step per row: the first forward's logits, float32 score copies, hidden states and FFN, attention
    # scores over the self cache and the encoder output (and the absorbed path's per-head rows), one layer's cache
    # copied while it grows
    per_row = (
        prompt_len * shape.vocab * size
        + SCORE_COPIES * shape.vocab * 4
        + prompt_len * (6 * d_model + 2 * shape.ffn) * size
        + 2 * shape.heads * prompt_len * (seq_len + source) * size
        + 3 * shape.heads * d_model * size
    )
    decode = rows * per_row + max(self_layers, default=0)
    if not encoder_decoder:  # the prefill of the whole batch: P tokens per row through one layer at a time
        scores = 2 * shape.heads * prompt_len * prompt_len * size if shape.eager else 0
        prefill = batch_size * num_beams * (prompt_len * (6 * d_model + 2 * shape.ffn) * size + scores)
        return BatchMemory(slim, batch_size, num_beams, seq_len, 0, batch_size, cache, 0, decode, prefill, 0)
    # one encoder input through one layer at a time: residual stream, norm, Q/K/V, attention output, FFN in and out
    # (Whisper's convolutions over 2 x frames stay below this), and the score matrix where attention is eager
    scores = 2 * shape.heads * source * source * size if shape.eager else 0
    per_input = source * (6 * d_model + 2 * shape.encoder_ffn) * size + scores
    encoded = batch_size * source * d_model * size
    decode_phase = cache + encoder_output + decode
    if encoder_batch is None:
        room = decode_phase - encoded
        encoder_batch = max(1, min(batch_size, room // max(per_input, 1)))
    encoder_batch = min(encoder_batch, batch_size)
    return BatchMemory(
        slim, batch_size, num_beams, seq_len, source, encoder_batch, cache, encoder_output, decode,
        encoder_batch * per_input, encoded,
    )  # fmt: skip


def largest_batch(model: torch.nn.Module, budget: int, seq_len: int, *, slim: bool, limit: int = 1 << 20, **kwargs):
    """The :class:`BatchMemory` of the largest batch whose estimated peak fits ``budget`` bytes, or None when not
    even one input fits. ``kwargs`` as :func:`batch_memory`. Peaks grow with the batch, so a doubling search and a
    bisection find it in ~2 log2(batch) estimates (shape arithmetic only)."""

    def plan(batch: int) -> BatchMemory:
        return batch_memory(model, batch, seq_len, slim=slim, **kwargs)

    if plan(1).peak > budget:
        return None
    low, high = 1, 2
    while high <= limit and plan(high).peak <= budget:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # plan(low) fits, plan(high) does not (or is past the limit)
        middle = (low + high) // 2
        low, high = (middle, high) if plan(middle).peak <= budget else (low, middle)
    return plan(low)


@contextlib.contextmanager
def encoder_micro_batches(model: torch.nn.Module, inputs_per_call: int) -> Iterator[None]:
    """Run ``model``'s encoder over at most ``inputs_per_call`` inputs per call, and concatenate the outputs.

    Why: generate() encodes the whole batch at once; the encoder's activations (hidden states and FFN of every
    frame of every input) would then set the peak, whatever the cache saves. Rows are independent in an encoder, so
    splitting the batch changes no output (each row is computed by the same kernels over the same row). The split
    applies to every call inside the block (Whisper's long-form windows included) and is undone after it.

    Tensors whose first dimension is the batch are split (``input_features``, ``input_ids``, ``attention_mask``);
    outputs are concatenated field by field. Calls that ask for attentions or hidden states run unsplit.
    """
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if encoder is None or encoder is model or inputs_per_call < 1:
        yield
        return
    had_own = "forward" in vars(encoder)  # accelerate's hooks install an instance forward; wrap and keep it
    original = encoder.forward

    def forward(*args, **kwargs):
        batch = _batch_of(args, kwargs)
        asks_details = kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
        if batch is None or batch <= inputs_per_call or asks_details:
            return original(*args, **kwargs)
        parts = [
            original(*_rows(args, batch, start, inputs_per_call), **_rows(kwargs, batch, start, inputs_per_call))
            for start in range(0, batch, inputs_per_call)
        ]
        return _concatenate(parts)

    encoder.forward = forward
    try:
        yield
    finally:
        if had_own:
            encoder.forward = original
        else:
            del encoder.forward


def _batch_of(args, kwargs) -> int | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _rows(values, batch: int, start: int, count: int):
    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            return value[start : start + count]
        return value

    if isinstance(values, dict):
        return {name: cut(value) for name, value in values.items()}
    return tuple(cut(value) for value in values)


def _concatenate(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple) and not hasattr(first, "keys"):
        return type(first)(_concatenate([part[i] for part in parts]) for i in range(len(first)))
    if first is None:
        return None
    if hasattr(first, "keys"):  # a ModelOutput: the same fields in every part
        return type(first)(**{key: _concatenate([part[key] for part in parts]) for key in first.keys()})
    return first
