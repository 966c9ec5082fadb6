"""Slim attention behind the model's own, unchanged attention forward: transformers' extension points only.

Most families compute attention the same way in transformers: project q/k/v (and rotate them), call
``cache.update(key, value, layer_idx)``, then call the attention function that ``ALL_ATTENTION_FUNCTIONS`` holds for
``self.config._attn_implementation``. hf_slim rides exactly those three points instead of copying the forward:

1. a thin forward wrapper (:func:`routed_forward`, installed on the module instance) stages the layer's own inputs
   (its input X, the rotary cos/sin, the encoder output) in the cache the layer was given, then calls the class's
   forward unchanged;
2. the slim cache's ``update`` (:meth:`hf_slim.cache.SlimCache.update`) returns a :class:`~hf_slim.step.SlimStep`
   instead of keys and values;
3. the module's ``config`` is a :class:`SlimAttentionConfig`, whose ``_attn_implementation`` names
   :func:`slim_attention`, registered in transformers' ``AttentionInterface`` under :data:`IMPLEMENTATION`: it runs
   the slim step (prefill through the model's own SDPA/eager function, decode on the absorbed path) or, for anything
   else, the model's own function.

Why: a copied forward drifts from transformers with every release (Optimum's BetterTransformer died of it); these
three points are what every such family's code is written against, so a release that renames arguments or rewrites
the forward's body keeps working. If a release stops calling ``cache.update`` or the attention function for a slim
layer, the wrapper notices that the staged step was never served and raises instead of producing wrong outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ._compat import TransformersContractError, find_cache, positional_parameters
from .absorbed import additive_bias
from .attention import slim_self_attention
from .bias import ScoreBias
from .cache import slim_cache_for
from .cross_attention import encoder_cross_attention, grouped_cross_attention
from .encoder_cache import EncoderOutputCache, adopt_cross_part
from .patching import resident_weights
from .registry import UnsupportedModelError
from .sites import AttentionRoute
from .step import SlimStep, StepInputs

#: The attention implementation name hf_slim registers (the attention modules of a slim model report it).
IMPLEMENTATION = "hf_slim"
#: The model attention implementations the slim paths understand (their masks and their functions).
SUPPORTED_ATTENTION = ("eager", "sdpa")


class SlimAttentionConfig:
    """``module.config`` of a slim attention module: the model's config, except that ``_attn_implementation`` names
    hf_slim's registered attention function, so the model's unchanged forward looks up :func:`slim_attention`.

    Every other attribute is read from (and written to) the model's config, so later changes to it are seen; the
    model's own ``config`` object is never changed (it may be shared by other models).
    """

    def __init__(self, base) -> None:
        object.__setattr__(self, "base", base)

    @property
    def _attn_implementation(self) -> str:
        return IMPLEMENTATION

    @_attn_implementation.setter
    def _attn_implementation(self, value) -> None:
        self.base._attn_implementation = value

    @property
    def model_implementation(self) -> str | None:
        """The attention implementation the model itself uses (``sdpa``, ``eager``, ...)."""
        return self.base._attn_implementation

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.base, name, value)

    def __reduce__(self):
        return SlimAttentionConfig, (self.base,)

    def __repr__(self) -> str:
        return f"SlimAttentionConfig({type(self.base).__name__}, attention {self.model_implementation!r} via hf_slim)"


def model_implementation(module: torch.nn.Module) -> str | None:
    """The attention implementation the model runs for this module (behind a :class:`SlimAttentionConfig`)."""
    config = getattr(module, "config", None)
    if isinstance(config, SlimAttentionConfig):
        return config.model_implementation
    return getattr(config, "_attn_implementation", None)


def check_implementation(module: torch.nn.Module) -> str:
    """The model's attention implementation for ``module``; one the slim paths cannot serve raises (e.g.
    ``model.set_attn_implementation("flex_attention")`` after slimify)."""
    implementation = model_implementation(module)
    if implementation not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"this slim model now uses attn_implementation={implementation!r} (set after slimify); hf_slim supports "
            f"{', '.join(SUPPORTED_ATTENTION)}: call model.set_attn_implementation('sdpa'), or "
            "hf_slim.unslimify(model) to use another implementation"
        )
    return implementation


def check_model_implementation(model: torch.nn.Module) -> None:
    """Refuse a model (or a sub-config of it) that runs an attention implementation the slim paths do not serve."""
    configs = [model.config] + [getattr(model.config, name) for name in model.config.sub_configs]
    for config in configs:
        implementation = getattr(config, "_attn_implementation", None)
        if implementation is not None and implementation not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attn_implementation={implementation!r} is not supported by hf_slim yet; load the model with "
                f"attn_implementation='sdpa' or 'eager' (supported: {', '.join(SUPPORTED_ATTENTION)})"
            )


def slim_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function a slim module's forward calls (registered as :data:`IMPLEMENTATION`).

    ``query: (batch, heads, new, head_dim)`` as the model made it (projected, scaled if the model scales it, rotated);
    ``key``/``value``: a :class:`~hf_slim.step.SlimStep` from the slim cache, or tensors ``(batch, heads, keys,
    head_dim)`` when the forward got no cache. Returns ``(batch, new, heads, head_dim)`` and the weights or None, as
    transformers' attention functions do.
    """
    state = module.hf_slim
    route: AttentionRoute = state.route
    implementation = check_implementation(module)
    # the function the unpatched model would call: its own eager one, or the registered one (SDPA)
    function = route.eager_function(module) if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    score_bias = route.score_bias
    _check_keywords(module, score_bias, kwargs)
    bias_value = kwargs.get(score_bias.name) if score_bias is not None and score_bias.source == "keyword" else None

    def run(q, k, v, mask):
        cut = {} if bias_value is None else score_bias.keyword_arguments(bias_value, k.shape[-2])
        return function(module, q, k, v, mask, scaling=scaling, dropout=dropout, **{**kwargs, **cut})

    want_weights = implementation == "eager"
    if not isinstance(key, SlimStep):  # no cache: the model's own attention, beams folded onto one encoder copy
        if state.mode == "encoder" and key.shape[0] != query.shape[0]:
            if bias_value is not None:  # one row per query: it joins the mask, which is folded with the queries
                attention_mask = additive_bias(attention_mask, bias_value.dtype)
                attention_mask = bias_value if attention_mask is None else attention_mask + bias_value
                bias_value = None
                kwargs[score_bias.name] = None
            return grouped_cross_attention(query, key, value, attention_mask, run)
        if state.mode == "encoder" and attention_mask is not None and 1 < attention_mask.shape[0] < query.shape[0]:
            # keys per decoder row (UMT5: AttentionRoute.expand_encoder), the mask still per input: repeat it alike
            attention_mask = attention_mask.repeat_interleave(query.shape[0] // attention_mask.shape[0], dim=0)
        return run(query, key, value, attention_mask)
    step: SlimStep = key
    step.inputs.attended = True
    term = None if score_bias is None else score_bias.term(module, bias_value)
    if state.mode == "encoder":
        return encoder_cross_attention(
            module,
            query,
            step.inputs.encoder_states,
            attention_mask,
            scale,
            run,
            want_weights=want_weights,
            position_bias=term,
            fresh=None if step.key is None else (step.key, step.value),
        )
    if score_bias is not None:
        score_bias.check_mask(attention_mask, type(module).__name__)
    inputs = step.inputs
    pre_norm_key = None
    if state.key_scale and route.pre_norm_keys is not None:
        pre_norm_key = route.pre_norm_keys(module, inputs.hidden_states)  # (b, t, e)
    position_ids = kwargs.get("position_ids", inputs.position_ids)
    return slim_self_attention(
        module,
        inputs.hidden_states,
        query,
        step.key,
        step.value,
        step.cache,
        attention_mask,
        scale,
        run,
        want_weights=want_weights,
        position_bias=term,
        rotary=inputs.rotary,
        position_ids=position_ids,
        pre_norm_key=pre_norm_key,
    )


#: tensors transformers hands attention functions that carry no score term (the slim paths read positions themselves)
_KNOWN_TENSOR_KEYWORDS = frozenset({"position_ids", "cache_position"})


def _check_keywords(module: torch.nn.Module, score_bias: ScoreBias | None, kwargs: dict) -> None:
    """Refuse a tensor keyword the slim paths would not apply (a new score term, such as a bias a release starts
    passing to the attention function): the prefill would hand it to the model's function, the decode would leave it
    out. The one a route declares as its score bias is applied."""
    declared = {score_bias.name} if score_bias is not None and score_bias.source == "keyword" else set()
    unknown = sorted(
        name
        for name, value in kwargs.items()
        if isinstance(value, torch.Tensor) and name not in _KNOWN_TENSOR_KEYWORDS | declared
    )
    if unknown:
        raise TransformersContractError(
            f"{type(module).__name__}.forward hands its attention function {', '.join(unknown)}, which hf_slim's slim "
            "decode does not apply: this transformers release changed that forward; call hf_slim.unslimify(model), "
            "or install a tested transformers release"
        )


AttentionInterface.register(IMPLEMENTATION, slim_attention)


@dataclass(frozen=True)
class RoutedSignature:
    """Where a routed forward's inputs arrive: the original forward's parameter names, read once at slimify."""

    names: tuple[str, ...]  # after self

    @classmethod
    def of(cls, forward: Callable) -> RoutedSignature:
        return cls(positional_parameters(forward))

    def argument(self, name: str | None, args: tuple, kwargs: dict):
        """The value passed for parameter ``name`` (by keyword or position), or None."""
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        index = self.names.index(name) if name in self.names else len(args)
        return args[index] if index < len(args) else None


def routed_forward(module: torch.nn.Module, signature: RoutedSignature, *args, **kwargs):
    """The instance forward of a routed slim attention module: stage its inputs in its cache, then run the class's
    own forward (with accelerate-offloaded weights kept real for the slim paths, which read projection weights after
    the projections ran)."""
    state = module.hf_slim
    route: AttentionRoute = state.route
    cache = find_cache(args, kwargs)
    inputs = None
    if cache is not None:
        inputs = _stage(module, state, route, signature, cache, args, kwargs)
    if route.expand_encoder:
        args, kwargs = _encoder_per_decoder_row(signature, route.encoder_parameter, args, kwargs)
    with resident_weights(module):
        output = type(module).forward(module, *args, **kwargs)
    if inputs is not None:
        if isinstance(cache, EncoderDecoderCache) and state.mode == "encoder":
            cache.cross_attention_cache.layer(state.layer_idx).release()
        if not inputs.attended:
            raise TransformersContractError(
                f"{type(module).__name__}.forward did not hand its cache's slim step to the attention function (it "
                "must call cache.update(...) and the function ALL_ATTENTION_FUNCTIONS holds for "
                "self.config._attn_implementation): this transformers release changed that forward, and hf_slim "
                "cannot serve it; call hf_slim.unslimify(model), or install a tested transformers release"
            )
    return output


def _encoder_per_decoder_row(signature: RoutedSignature, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with the encoder output ``(inputs, frames, d)`` repeated to the decoder's ``(inputs * group,
    frames, d)`` rows, for a forward that sizes its own encoder keys by the decoder batch (UMT5): only what that
    forward computes itself sees the copies."""
    encoder_states = signature.argument(name, args, kwargs)
    hidden_states = args[0] if args else kwargs.get(signature.names[0])
    if encoder_states is None or encoder_states.shape[0] == hidden_states.shape[0]:
        return args, kwargs
    expanded = encoder_states.repeat_interleave(hidden_states.shape[0] // encoder_states.shape[0], dim=0)
    index = signature.names.index(name)
    if name not in kwargs and index < len(args):
        return (*args[:index], expanded, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: expanded}


def _stage(module, state, route: AttentionRoute, signature: RoutedSignature, cache, args, kwargs) -> StepInputs:
    hidden_states = args[0] if args else kwargs.get(signature.names[0])
    inputs = StepInputs(hidden_states=hidden_states, position_ids=kwargs.get("position_ids"))
    if state.mode == "encoder":
        inputs.encoder_states = signature.argument(route.encoder_parameter, args, kwargs)
        if isinstance(cache, EncoderDecoderCache):
            adopt_cross_part(cache)  # the empty K/V part a model's forward pairs a slim cache with (GPT-2)
        cross = cache.cross_attention_cache if isinstance(cache, EncoderDecoderCache) else None
        if not isinstance(cross, EncoderOutputCache):
            raise TypeError(
                f"hf_slim: {type(module).__name__} (cross-attention of layer {state.layer_idx}) is slimified but got a "
                f"{type(cache).__name__} without hf_slim's cross-attention part; let generate()/forward() create the "
                "cache (pass none), pass hf_slim.SlimCache(), or call hf_slim.unslimify(model)"
            )
        cross.stage(state.layer_idx, inputs)
        return inputs
    if route.rotary_parameter is not None:
        embeddings = signature.argument(route.rotary_parameter, args, kwargs)
        inputs.rotary = embeddings if route.rotary_columns is None else route.rotary_columns(embeddings)
    slim = slim_cache_for(cache, state.layer_idx, where=type(module).__name__)
    slim.stage(state.layer_idx, inputs)
    return inputs
