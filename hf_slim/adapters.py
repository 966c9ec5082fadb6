"""Reading a projection's live weights, including PEFT LoRA adapters on it.

Why: the slim decode does not call the key/value projections on cached tokens; it applies their weights to other
tensors (absorbed queries, mixed cache rows). So it must see every term the projection's forward adds. A PEFT LoRA
layer wraps the original ``nn.Linear``/``Conv1D`` as ``base_layer`` and adds ``scale * lora_B(lora_A(x))`` for each
active adapter; reading ``layer.weight`` alone (PEFT forwards it to the base layer) would silently drop the adapter.
The update is low rank, so it is kept as two thin factors (:class:`LowRank`) and absorbed at rank-r cost rather than
merged into a full ``d x e`` matrix every step.

PEFT features that cannot be served exactly this way (DoRA and other LoRA variants, ``lora_bias``, dropout while
training, per-row ``adapter_names`` batches, other tuner types) are refused with a message that says to merge the
adapters first.

Quantized layers (:func:`read_projection` is the one place that classifies a layer): a projection is used only if
hf_slim knows exactly what it computes. bitsandbytes 4-bit, optimum-quanto weight-only and torchao weight-only layers
compute ``x @ dequantize(W).T + b``, so their dequantized weight is read (a dense copy of the layer, made at each read
and dropped after the step, as their own forwards make one); bitsandbytes 8-bit (LLM.int8()) and every layer that
quantizes its input compute something no fixed weight reproduces and are refused, and so is every other subclass of
``nn.Linear`` or tensor subclass as weight.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D


class UnsupportedProjectionError(ValueError):
    """A key/value projection layer whose computation hf_slim cannot reproduce exactly in its slim decode (a quantized
    or other layer kind it does not know, or one that quantizes its input)."""


class UnsupportedAdapterError(UnsupportedProjectionError):
    """A PEFT adapter on a key/value projection that hf_slim cannot apply exactly in its slim decode."""


_MERGE_FIRST = "merge the adapters into the weights first (peft: model = model.merge_and_unload()), then slimify"


@dataclass(frozen=True)
class LowRank:
    """One LoRA update of a projection, ``y += scale * (x @ down) @ up``.

    Shapes: ``down: (d_in, r)``, ``up: (r, out)``; views of the live adapter weights.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def columns(self, columns: slice | torch.Tensor) -> LowRank:
        """The update restricted to some output columns (one part of a fused projection such as GPT-2's c_attn)."""
        return LowRank(self.down, self.up[:, columns], self.scale)


def _is_peft_layer(layer: torch.nn.Module) -> bool:
    # a dict lookup, not hasattr: this runs at every decode step, and a missing nn.Module attribute raises inside
    return "base_layer" in layer._modules and hasattr(layer, "active_adapters")


def holds_adapter_layers(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a submodule is a PEFT tuner layer, whose adapters can be switched, disabled, merged or
    rescaled by flags alone (no tensor changes)."""
    return any(_is_peft_layer(sub) for sub in module.modules())


def _low_rank_terms(layer: torch.nn.Module, where: str) -> tuple[LowRank, ...]:
    """The LoRA updates a PEFT layer's forward adds right now (none when adapters are disabled or merged)."""
    if not hasattr(layer, "lora_A"):
        raise UnsupportedAdapterError(
            f"{where} carries a PEFT {type(layer).__name__} adapter, which hf_slim cannot apply in its slim decode; "
            + _MERGE_FIRST
        )
    if layer._forward_pre_hooks:
        raise UnsupportedAdapterError(
            f"{where}: a forward pre-hook is set on the LoRA layer (PEFT does this for per-row adapter_names batches), "
            "which hf_slim cannot follow in its slim decode; generate with one active adapter, or " + _MERGE_FIRST
        )
    if layer.disable_adapters or layer.merged:
        return ()
    terms = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            raise UnsupportedAdapterError(f"{where}: adapter {name!r} is a LoRA variant (e.g. DoRA); " + _MERGE_FIRST)
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if getattr(lora_b, "bias", None) is not None:
            raise UnsupportedAdapterError(f"{where}: adapter {name!r} has lora_bias; " + _MERGE_FIRST)
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
            raise UnsupportedAdapterError(
                f"{where}: adapter {name!r} applies dropout (training mode); call model.eval() before decoding"
            )
        # lora_A: Linear(d_in -> r), weight (r, d_in); lora_B: Linear(r -> out), weight (out, r)
        terms.append(LowRank(down=lora_a.weight.T, up=lora_b.weight.T, scale=float(layer.scaling[name])))
    return tuple(terms)


def _plain_tensors(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plain tensors that hold a (possibly subclassed) tensor's data: itself, or for a wrapper subclass such as
    torchao's or optimum-quanto's quantized tensors its inner tensors (``__tensor_flatten__``), whose version counters
    and data pointers a K-mode stamp can watch (the wrapper's own are not its data's)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return (tensor,)
    names, _ = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name) for name in names)
    return tuple(t for part in inner if isinstance(part, torch.Tensor) for t in _plain_tensors(part))


def _is_plain(tensor: torch.Tensor | None) -> bool:
    """A tensor whose values are its elements (not a quantized or other subclass that computes them)."""
    return tensor is None or type(tensor) in (torch.Tensor, torch.nn.Parameter)


#: torchao weight tensor classes whose ``F.linear(x, W, b)`` is ``x @ W.dequantize().T + b`` when the listed attributes
#: are None (those name activation quantization or scaling of the input, which no fixed weight reproduces).
_TORCHAO_WEIGHT_ONLY = {
    "Int8Tensor": ("act_quant_kwargs", "act_pre_scale", "act_quant_scale"),
    "IntxUnpackedToInt8Tensor": ("activation_quantization",),
    "Float8Tensor": ("act_quant_kwargs",),
}
#: Subclasses of ``nn.Linear`` whose forward is known to compute ``x @ W.T + b`` (module, class name): each one read
#: and checked against its transformers source. Every other subclass is refused (its forward may compute anything).
_EXACT_LINEAR_SUBCLASSES = {
    ("transformers.models.falcon.modeling_falcon", "FalconLinear"),  # input @ weight.T, then + bias (unfused)
}
_SUPPORTED_KINDS = (
    "torch nn.Linear, transformers Conv1D, PEFT LoRA on them, bitsandbytes 4-bit (Linear4bit), optimum-quanto "
    "weight-only QLinear, torchao weight-only int8/intx/float8 weights"
)
_RELOAD = "load the model without quantization (or with a supported one) to slimify it"


def _module_is(layer: torch.nn.Module, package: str, names: tuple[str, ...]) -> bool:
    """Whether ``type(layer)`` is exactly one of the classes ``names`` of ``package`` (which must already be imported:
    a layer of one of its classes cannot exist otherwise)."""
    module = type(layer).__module__
    return (module == package or module.startswith(package + ".")) and type(layer).__name__ in names


def _effective_weight(layer: torch.nn.Module, where: str) -> tuple[torch.Tensor, str]:
    """The weight ``W: (out, in)`` with which ``layer(x) == x @ W.T + bias`` (up to the rounding of the product), and
    the name of the layer kind; raise :class:`UnsupportedProjectionError` for a layer that computes anything else.

    Why a closed list: the slim decode applies the projections' weights to other tensors (absorbed queries, cached
    rows), so it must know exactly what each layer computes. A subclass of ``nn.Linear`` may override ``forward``
    (bitsandbytes' 8-bit layer quantizes its input rows; optimum-quanto's quantizes its weights inside ``forward``),
    and a tensor subclass as weight may compute with values other than its elements: neither is trusted unless known.
    """
    kind = type(layer)
    if (kind is torch.nn.Linear or (kind.__module__, kind.__name__) in _EXACT_LINEAR_SUBCLASSES) and _is_plain(
        layer.weight
    ):
        return layer.weight, "linear"
    if kind is torch.nn.Linear and type(layer.weight).__name__ in _TORCHAO_WEIGHT_ONLY:  # torchao: a tensor subclass
        weight = layer.weight
        if not type(weight).__module__.startswith("torchao."):
            raise UnsupportedProjectionError(f"{where}: weight of unknown type {type(weight).__name__}; {_RELOAD}")
        names = _TORCHAO_WEIGHT_ONLY[type(weight).__name__]
        active = [name for name in names if getattr(weight, name, None) is not None]
        if active:
            raise UnsupportedProjectionError(
                f"{where}: its torchao {type(weight).__name__} weight quantizes or scales the layer's input too "
                f"({', '.join(active)}), which no fixed weight reproduces, so the slim decode could not compute what "
                "the layer computes; use a weight-only torchao config (e.g. Int8WeightOnlyConfig), or " + _RELOAD
            )
        return weight.dequantize(), "torchao"
    if kind is torch.nn.Linear:
        raise UnsupportedProjectionError(
            f"{where}: an nn.Linear whose weight is a {type(layer.weight).__name__} (a tensor subclass hf_slim does "
            f"not know to compute x @ W.T exactly); supported: {_SUPPORTED_KINDS}; {_RELOAD}"
        )
    if _module_is(layer, "bitsandbytes", ("Linear4bit", "LinearNF4", "LinearFP4")):
        return _bitsandbytes_4bit_weight(layer), "bitsandbytes-4bit"
    if _module_is(layer, "bitsandbytes", ("Linear8bitLt",)):
        raise UnsupportedProjectionError(
            f"{where} is a bitsandbytes 8-bit layer (LLM.int8()): it rounds every input row to int8 inside the "
            "product, which is not linear in the input, so the slim decode (which applies W_K and W_V to cached "
            "tensors) cannot compute what it computes; load with BitsAndBytesConfig(load_in_4bit=True) or without "
            "quantization"
        )
    if _module_is(layer, "optimum.quanto", ("QLinear",)):
        if layer.activation_qtype is not None or layer._quantize_hooks or layer.weight_qtype is None:
            raise UnsupportedProjectionError(
                f"{where} is an optimum-quanto QLinear that quantizes activations "
                f"({layer.activation_qtype.name if layer.activation_qtype else 'no weights'}), which no fixed weight "
                "reproduces; quantize the weights only (quantize(model, weights=qint8)), or " + _RELOAD
            )
        # frozen: the stored quantized weight; not frozen: the weights quantized as forward quantizes them per call
        return layer.qweight.dequantize(), "quanto"
    raise UnsupportedProjectionError(
        f"{where} is a {kind.__module__}.{kind.__name__}, not a layer kind hf_slim knows to compute x @ W.T + b "
        f"exactly (supported: {_SUPPORTED_KINDS}); {_RELOAD}, or merge adapters into the weights first"
    )


def _bitsandbytes_4bit_weight(layer: torch.nn.Module) -> torch.Tensor:
    """``W: (out, in)`` of a bitsandbytes ``Linear4bit``: its 4-bit codes times their block scales
    (``dequantize_4bit``), in the model dtype.

    On CPUs with AVX512-BF16 the layer switches at its first forward to a repacked layout whose kernel keeps the
    block scales in bf16 and computes in bf16 (inputs, code values and outputs rounded: about 3e-3 relative per
    layer, which no weight reproduces bit for bit); that layout is unpacked here into a copy of the quantization state
    (the layer's own is never touched), with the bf16 scales the kernel uses.
    """
    import copy

    import bitsandbytes.functional as functional

    weight, state = layer.weight, layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return functional.dequantize_4bit(weight.data, state)  # (out, in)
    unpack = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:
        raise UnsupportedProjectionError(
            f"this bitsandbytes {getattr(sys.modules.get('bitsandbytes'), '__version__', '?')} keeps 4-bit weights in "
            "a CPU layout hf_slim cannot read; use bitsandbytes 0.49 to 0.50, or " + _RELOAD
        )
    unpacked_state = copy.copy(state)  # the unpacking writes to the state it is given
    unpacked_state.original_nested = False  # the scales are replaced below: do not quantize them again
    codes, unpacked_state = unpack(weight.data, unpacked_state)
    unpacked_state.absmax = state.absmax.T.reshape(-1).float()  # (out * in / blocksize,), row-major blocks
    unpacked_state.nested = False
    dtype = unpacked_state.dtype
    return functional.dequantize_4bit(codes, unpacked_state).to(dtype)  # (out, in)


@dataclass(frozen=True)
class LayerWeights:
    """What one projection layer computes, ``y = x @ weight + bias + LoRA updates``, read from the live layer.

    ``weight: (d_in, out)``: a view of the parameter for plain layers, a fresh dense copy for quantized ones
    (dequantized at every read: nothing dense is kept between steps). ``sources``: the plain tensors the layer's state
    lives in (what a K-mode stamp watches). ``kind``: ``"linear"``, ``"conv1d"``, ``"bitsandbytes-4bit"``,
    ``"quanto"`` or ``"torchao"``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    low_rank: tuple[LowRank, ...]
    sources: tuple[torch.Tensor, ...]
    kind: str


def read_projection(layer: torch.nn.Module, *, where: str = "projection") -> LayerWeights:
    """The live :class:`LayerWeights` of a projection layer: the one place that decides which layer kinds the slim
    path understands exactly (plain ``nn.Linear``, transformers ``Conv1D``, a PEFT LoRA layer wrapping a supported
    layer, and the quantized kinds whose exact dequantization is known); everything else raises
    :class:`UnsupportedProjectionError` (:class:`UnsupportedAdapterError` for PEFT adapters it cannot serve)."""
    terms: tuple[LowRank, ...] = ()
    if _is_peft_layer(layer):
        terms = _low_rank_terms(layer, where)
        layer = layer.base_layer
    if type(layer) is Conv1D and _is_plain(layer.weight):
        weight, kind = layer.weight, "conv1d"  # (in, out)
    else:
        dense, kind = _effective_weight(layer, where)  # (out, in)
        weight = dense.T
    bias = layer.bias
    if not _is_plain(bias):
        raise UnsupportedProjectionError(f"{where}: its bias is a {type(bias).__name__}; {_RELOAD}")
    sources = tuple(t for part in (layer.weight, bias) if part is not None for t in _plain_tensors(part))
    if kind == "bitsandbytes-4bit":  # the per-block scales of the 4-bit codes
        sources += (layer.weight.quant_state.absmax,)
    return LayerWeights(weight, bias, terms, sources, kind)


def projection_weights(
    layer: torch.nn.Module,
    columns: slice | torch.Tensor = slice(None),
    *,
    where: str = "projection",
    read: LayerWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[LowRank, ...], tuple[torch.Tensor, ...]]:
    """The live ``(weight, bias, low-rank updates)`` of a linear projection, as ``y = x @ weight + bias + updates``.

    Parameters
    ----------
    layer:
        a projection layer of a kind :func:`read_projection` accepts.
    columns:
        the output columns to keep (one of q/k/v in a fused projection): a slice (views), or an index tensor for
        layouts that interleave heads (a gathered copy).
    where:
        name used in error messages.
    read:
        the layer's :class:`LayerWeights` if already read (a fused layer serving both K and V is dequantized once).

    Returns
    -------
    ``weight: (d_in, out)``, ``bias: (out,)`` or None, the active LoRA updates restricted to ``columns``, and the
    tensors they were read from (what a K-mode stamp watches: a gathered copy is new at every call).
    """
    read = read_projection(layer, where=where) if read is None else read
    bias = None if read.bias is None else read.bias[columns]
    return read.weight[:, columns], bias, tuple(term.columns(columns) for term in read.low_rank), read.sources


def apply_low_rank(states: torch.Tensor, terms: tuple[LowRank, ...]) -> torch.Tensor | None:
    """``sum_j scale_j * (states @ down_j) @ up_j`` in float32, ``(..., d_in) -> (..., out)``; None without terms."""
    total = None
    for term in terms:
        delta = (states.float() @ term.down.float()) @ term.up.float() * term.scale
        total = delta if total is None else total + delta
    return total
