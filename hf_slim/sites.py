"""What an architecture patch tells the shared machinery: its attention sites and where its cache is created."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._compat import TransformersContractError
from .bias import ScoreBias
from .kmode import KModeWeights, solve_k_mode
from .patching import resident_weights
from .projections import Projections
from .rope import RotaryLayout, RotarySource, find_rotary_frequencies


@dataclass(frozen=True)
class AttentionRoute:
    """How one attention class of a family is served through the extension points (declared by its patch module).

    Attributes
    ----------
    rotary_parameter:
        the forward parameter that receives the RoPE ``position_embeddings``, or None (no RoPE).
    rotary_columns:
        ``position_embeddings -> (cos, sin)``, each ``(batch|1, new, rotary_dim)`` as they multiply the key columns
        (Llama's are that already; GPT-J's come as ``(sin, cos)`` of half width, one entry per rotated pair).
    encoder_parameter:
        the forward parameter that receives the encoder output for cross-attention (``key_value_states``,
        ``encoder_hidden_states``), or None.
    eager:
        ``module -> function`` giving the model file's own eager attention for that module (what
        ``attn_implementation="eager"`` runs), default the module's file's ``eager_attention_forward``.
    pre_norm_keys:
        ``(module, hidden_states) -> keys`` before a per-token key norm (OLMo-2's ``k_norm``), for the key scale
        the K cache keeps; None where the keys are not normalised.
    score_bias:
        where the layer's additive score bias comes from (:class:`~hf_slim.bias.ScoreBias`: in the mask, or a
        keyword of the attention function), or None: the mask is all there is (no position term in the scores).
    expand_encoder:
        the forward sizes the keys it computes from the encoder output by the decoder's batch (UMT5's
        ``view(batch_size, ...)``): with beams over one encoder copy per input, the forward is handed that output
        repeated per decoder row (the slim paths read the one copy).
    """

    rotary_parameter: str | None = None
    rotary_columns: Callable | None = None
    encoder_parameter: str | None = None
    eager: Callable[[torch.nn.Module], Callable] | None = None
    pre_norm_keys: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    score_bias: ScoreBias | None = None
    expand_encoder: bool = False

    def eager_function(self, module: torch.nn.Module) -> Callable:
        if self.eager is not None:
            return self.eager(module)
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise TransformersContractError(
                f"{type(module).__module__} has no eager_attention_forward for {type(module).__name__}; hf_slim "
                "needs the model's own eager attention function"
            )
        return function


@dataclass
class AttentionSite:
    """One attention module to patch.

    Attributes
    ----------
    module:
        the model's attention module (patched in place, on this instance only).
    kind:
        ``"self"`` (causal self-attention with a slim cache) or ``"cross"`` (attention over the encoder output).
    layer_idx:
        slot of this layer in the slim cache (self-attention) or its decoder layer (cross-attention).
    num_heads, head_dim:
        head layout.
    projections:
        ``projections(module) -> Projections`` reading the live weights.
    forward:
        the replacement forward, a plain function taking the module as first argument, for families whose
        attention transformers computes itself (T5's position bias, ALiBi, ...); None for a routed site.
    route:
        how the model's own forward is served through transformers' extension points (:mod:`hf_slim.interface`),
        for families whose forward calls ``cache.update`` and the registered attention function; None for a site
        with a replacement ``forward``.
    rotary:
        RoPE layout (keys cached rotated, un-rotated for the values), or None for models without RoPE.
    rotary_source:
        how the layer's cos/sin are recomputed from positions (:mod:`hf_slim.rope`), or None (RoPE layers: the
        cache then keeps the cos/sin table).
    k_mode_refusal:
        why this layer cannot use the K cache exactly (e.g. OLMo's clamped keys), or None; such a layer keeps the
        model's own K and V.
    """

    module: torch.nn.Module
    kind: str
    layer_idx: int
    num_heads: int
    head_dim: int
    projections: Callable[[torch.nn.Module], Projections]
    forward: Callable | None
    rotary: RotaryLayout | None = None
    k_mode_refusal: str | None = None
    rotary_source: RotarySource | None = None
    route: AttentionRoute | None = None

    @classmethod
    def of(
        cls,
        module: torch.nn.Module,
        kind: str,
        projections: Callable[[torch.nn.Module], Projections],
        forward: Callable | AttentionRoute,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        rotary: RotaryLayout | None = None,
        k_mode_refusal: str | None = None,
        rotary_source: RotarySource | None = None,
    ) -> AttentionSite:
        """A site for ``module``, reading ``layer_idx``, ``num_heads`` and ``head_dim`` from it unless given;
        ``forward`` is the replacement forward or the :class:`~hf_slim.interface.AttentionRoute` of a routed site."""
        route = forward if isinstance(forward, AttentionRoute) else None
        return cls(
            module=module,
            kind=kind,
            layer_idx=module.layer_idx,
            num_heads=module.num_heads if num_heads is None else num_heads,
            head_dim=module.head_dim if head_dim is None else head_dim,
            projections=projections,
            forward=None if route is not None else forward,
            rotary=rotary,
            k_mode_refusal=k_mode_refusal,
            rotary_source=rotary_source,
            route=route,
        )

    @property
    def name(self) -> str:
        return f"{type(self.module).__name__}[{self.kind} {self.layer_idx}]"


def solve_layer_k_mode(site: AttentionSite, residual_rank: int = 0) -> KModeWeights:
    """:func:`~hf_slim.kmode.solve_k_mode` on a site's real weights (accelerate-offloaded ones are loaded for the
    solve)."""
    with resident_weights(site.module):
        return solve_k_mode(site.projections(site.module), residual_rank)


def token_calibration_inputs(model: torch.nn.Module) -> dict:
    """Random token ids ``(2, 64)`` for the K-mode calibration of a text model when the user gives none, and as many
    decoder token ids for an encoder-decoder (real text calibrates better: pass ``calibration_inputs``)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (2, 64), generator=generator, device="cpu")}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (2, 64), generator=generator, device="cpu")
    return {name: ids.to(model.device) for name, ids in inputs.items()}


def instances_of(model: torch.nn.Module, classes: tuple[type, ...]) -> list[torch.nn.Module]:
    """The submodules of ``model`` (itself included) whose exact type is one of ``classes``, in module order.

    Exact types, not ``isinstance``: a family's patch serves the classes it was adapted from, not subclasses that
    other model types may define on top of them.
    """
    return [module for module in model.modules() if type(module) in classes]


def rope_attention_sites(
    model: torch.nn.Module,
    classes: tuple[type, ...],
    projections: Callable[[torch.nn.Module], Projections],
    forward: Callable | AttentionRoute,
    rotary: RotaryLayout,
    *,
    k_mode_refusal: Callable[[torch.nn.Module], str | None] = lambda module: None,
    head_dim: Callable[[torch.nn.Module], int] | None = None,
    rotary_source: Callable[[torch.nn.Module], RotarySource] | None = None,
) -> list[AttentionSite]:
    """The self-attention sites of a RoPE family: every module of ``classes``, all heads of ``config``'s count.

    ``k_mode_refusal(module)`` says why a layer cannot take the K cache (it then keeps its own K and V);
    ``head_dim(module)`` reads a head width the module does not call ``head_dim``; ``rotary_source(module)`` says
    where a layer's cos/sin come from (default: the model's one rotary embedding module,
    :func:`~hf_slim.rope.find_rotary_frequencies`).
    """
    shared = find_rotary_frequencies(model) if rotary_source is None else None
    return [
        AttentionSite.of(
            module,
            "self",
            projections,
            forward,
            num_heads=module.config.num_attention_heads,
            head_dim=None if head_dim is None else head_dim(module),
            rotary=rotary,
            k_mode_refusal=k_mode_refusal(module),
            rotary_source=shared if rotary_source is None else rotary_source(module),
        )
        for module in instances_of(model, classes)
    ]
