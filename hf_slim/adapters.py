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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D


class UnsupportedAdapterError(ValueError):
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


def projection_weights(
    layer: torch.nn.Module, columns: slice | torch.Tensor = slice(None), *, where: str = "projection"
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[LowRank, ...], tuple[torch.Tensor, ...]]:
    """The live ``(weight, bias, low-rank updates)`` of a linear projection, as ``y = x @ weight + bias + updates``.

    Parameters
    ----------
    layer:
        an ``nn.Linear`` (weight ``(out, in)``), a transformers ``Conv1D`` (weight ``(in, out)``), or a PEFT LoRA
        layer wrapping one of them.
    columns:
        the output columns to keep (one of q/k/v in a fused projection): a slice (views), or an index tensor for
        layouts that interleave heads (a gathered copy).
    where:
        name used in error messages.

    Returns
    -------
    ``weight: (d_in, out)``, ``bias: (out,)`` or None, the active LoRA updates restricted to ``columns``, and the
    parameters they were read from (what a K-mode stamp watches: a gathered copy is new at every call).
    """
    terms: tuple[LowRank, ...] = ()
    if _is_peft_layer(layer):
        terms = tuple(term.columns(columns) for term in _low_rank_terms(layer, where))
        layer = layer.base_layer
    if isinstance(layer, Conv1D):
        weight = layer.weight[:, columns]  # (in, out)
    elif isinstance(layer, torch.nn.Linear):
        weight = layer.weight.T[:, columns]  # (in, out)
    else:
        raise UnsupportedAdapterError(
            f"{where} is a {type(layer).__name__}, not a linear layer hf_slim can read weights from (quantized or "
            "adapted layers need their weights merged or dequantized first)"
        )
    bias = None if layer.bias is None else layer.bias[columns]
    sources = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
    return weight, bias, terms, sources


def apply_low_rank(states: torch.Tensor, terms: tuple[LowRank, ...]) -> torch.Tensor | None:
    """``sum_j scale_j * (states @ down_j) @ up_j`` in float32, ``(..., d_in) -> (..., out)``; None without terms."""
    total = None
    for term in terms:
        delta = (states.float() @ term.down.float()) @ term.up.float() * term.scale
        total = delta if total is None else total + delta
    return total
