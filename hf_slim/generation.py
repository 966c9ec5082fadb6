"""generate() and forward hooks of a slim model: the cache-creating forwards start from a slim cache, generate()
prepares one (and checks the K-mode buffers against the weights first), per-step working state is dropped after each
forward; the overrides shared by encoder-decoder patches; and the contracts of the generation internals hf_slim wraps
(checked by slimify, see :mod:`hf_slim._compat`)."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.generation.utils import GenerationMixin

from ._compat import Contract, cache_entry, cache_parameter, find_cache, generic_expand_inputs
from .cache import SlimCache, self_attention_part
from .encoder_cache import EncoderOutputCache, adopt_cross_part
from .patching import InstancePatch, PatchedMethod, resident_weights
from .record import SlimRecord

#: ``_prepare_slim_cache_for_generation`` reads ``generation_config`` and ``model_kwargs`` (positional in
#: generate()); :func:`expand_inputs_keeping_encoder_output` takes the arguments of the generic expansion.
CONTRACTS = (
    Contract(GenerationMixin, "_prepare_cache_for_generation", parameters=("generation_config", "model_kwargs")),
    Contract(
        GenerationMixin,
        "_expand_inputs_for_generation",
        parameters=("expand_size", "is_encoder_decoder", "input_ids"),
    ),
)


def keep_one_encoder_output_per_input(model: torch.nn.Module) -> InstancePatch:
    """Patch ``model._expand_inputs_for_generation`` so beam search keeps one encoder output per input."""
    return InstancePatch(
        model, "_expand_inputs_for_generation", PatchedMethod(expand_inputs_keeping_encoder_output, model)
    )


def expand_inputs_keeping_encoder_output(
    self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
):
    """Expand the decoder inputs for beams / returned sequences as transformers does, but not the encoder output.

    The encoder output ``E: (inputs, frames, d_model)`` stays one copy per input; the cross-attention maps the
    ``inputs * expand_size`` decoder rows onto it (:func:`hf_slim.cross_attention.encoder_cross_attention`).
    transformers would repeat every tensor of ``encoder_outputs`` ``expand_size`` times (``repeat_interleave``: beams
    of one input are adjacent, which is the row order the folding assumes). The encoder's ``attention_mask`` stays
    unexpanded with it, so the cross-attention mask the model builds has one row per input too.
    """
    encoder_outputs = model_kwargs.pop("encoder_outputs", None)
    if expand_size == 1 or not is_encoder_decoder or encoder_outputs is None:
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return generic_expand_inputs(
            self, expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
    # the encoder's padding mask stays with the encoder output: one row per input, folded like E
    encoder_mask = model_kwargs.pop("attention_mask", None)
    input_ids, model_kwargs = generic_expand_inputs(
        self, expand_size=expand_size, is_encoder_decoder=False, input_ids=input_ids, **model_kwargs
    )
    model_kwargs["encoder_outputs"] = encoder_outputs
    if encoder_mask is not None:
        model_kwargs["attention_mask"] = encoder_mask
    return input_ids, model_kwargs


def _use_cache_requested(owner: torch.nn.Module, arguments: dict) -> bool:
    use_cache = arguments.get("use_cache")
    if use_cache is None:
        use_cache = getattr(owner.config, "use_cache", False)
    return bool(use_cache) and not (getattr(owner, "gradient_checkpointing", False) and owner.training)


def forward_with_slim_cache(owner: torch.nn.Module, record: SlimRecord) -> PatchedMethod:
    """Wrap the forward that would create a DynamicCache so that it starts from a slim cache instead.

    The forward's parameter names, and which one takes the cache (:func:`~hf_slim._compat.cache_parameter`: read
    from the installed code, not a name hf_slim knows), are read once here (this wrapper runs at every decode step).
    """
    forward = type(owner).forward
    names = tuple(inspect.signature(forward).parameters)[1:]  # after self
    return PatchedMethod(
        _slim_cache_owner_forward, owner, record, names, cache_parameter(forward), signature_of=forward
    )


def _slim_cache_owner_forward(
    owner: torch.nn.Module, record: SlimRecord, names: tuple[str, ...], cache_name: str, *args, **kwargs
):
    original = type(owner).forward  # what forward_attribute(owner) held: the class forward (accelerate's hook wraps us)
    cache = find_cache(args, kwargs)
    if cache is None:
        arguments = {**dict(zip(names, args, strict=False)), **kwargs}
        if arguments.get(cache_name) is not None or not _use_cache_requested(owner, arguments):
            return original(owner, *args, **kwargs)
        cache = record.new_cache()
        _check_new_cache(record, cache)
        position = names.index(cache_name)
        if len(args) > position:
            args = (*args[:position], cache, *args[position + 1 :])
        else:
            kwargs[cache_name] = cache
        return _ending_step(cache, original(owner, *args, **kwargs))
    if isinstance(cache, SlimCache):
        cache.adopt_layout(record.num_cache_layers, record.kv_layers)  # a user's SlimCache() for a mixed model
    if record.is_encoder_decoder and type(cache) is SlimCache:
        # a bare SlimCache for an encoder-decoder model: pair it with the cross-attention part, as generate()
        # does (Whisper's decoder would otherwise replace it by a K/V EncoderDecoderCache)
        paired = EncoderDecoderCache(cache, EncoderOutputCache())
        args = tuple(paired if value is cache else value for value in args)
        kwargs = {key: paired if value is cache else value for key, value in kwargs.items()}
        cache = paired
    if isinstance(cache, EncoderDecoderCache):
        adopt_cross_part(cache)
    _check_new_cache(record, cache)
    return _ending_step(cache, original(owner, *args, **kwargs))


def _check_new_cache(record: SlimRecord, cache) -> None:
    """Before the first forward on a slim cache that no check has seen (a new one, or a user's), check the K-mode
    layers' derived buffers against the live weights (:func:`check_derived_state`). A plain attribute test at every
    other step, so compiled decode steps of a checked cache stay one graph."""
    inner = self_attention_part(cache)
    if record.has_derived_state and isinstance(inner, SlimCache) and not getattr(inner, "derived_state_checked", False):
        check_derived_state(record, inner)


@torch.compiler.disable
def check_derived_state(record: SlimRecord, cache: SlimCache | None = None) -> None:
    """Check every K-mode layer's weight-derived buffers (``W_KV``, value offset, ``z_proj``) against the live weights
    and dtype, eagerly (outside any compiled region), and mark ``cache`` as checked.

    One read of W_K, W_V and the buffers per K-mode layer (float64 sketches, :class:`~hf_slim.kmode.KSourceStamp`):
    weights that changed in any way (``param.data`` edits and compiled models included) raise
    :class:`~hf_slim.kmode.StaleKModeWeights`; buffers that lost their values while the weights did not (``to_empty``
    after a move through the meta device) are solved again. Runs before every ``generate()`` and at the first forward
    on every new slim cache (``scripts/bench_derived_check.py`` measures it against a decode step).
    """
    for module, state in record.k_layers():
        with resident_weights(module):
            state.verify_derived(module)
    if cache is not None:
        cache.derived_state_checked = True


def _ending_step(cache, output):
    """Drop the slim cache's per-step working state (the rotary table of the step) once the forward is done: it is
    not part of the cache and must not hold memory between steps."""
    inner = self_attention_part(cache)
    if isinstance(inner, SlimCache):
        inner.end_step()
    return output


def prepare_slim_cache(model: torch.nn.Module, record: SlimRecord) -> PatchedMethod:
    """generate() hook: let transformers prepare its cache, then swap its fresh DynamicCache for a slim one."""
    return PatchedMethod(_prepare_slim_cache_for_generation, model, record)


def _prepare_slim_cache_for_generation(self, record: SlimRecord, generation_config, model_kwargs, *args, **kwargs):
    original = type(self)._prepare_cache_for_generation
    _, user_cache = cache_entry(model_kwargs)  # by type: whatever name generate() keeps it under
    if user_cache is None and generation_config.cache_implementation not in (None, "dynamic", "static"):
        raise NotImplementedError(
            f"hf_slim does not support cache_implementation={generation_config.cache_implementation!r}; use "
            "the default (dynamic) or 'static', which hf_slim replaces by the matching slim cache"
        )
    if generation_config.cache_implementation == "static" and record.static_cache_refusal:
        raise NotImplementedError(f"cache_implementation='static': {record.static_cache_refusal}")
    if record.has_derived_state:
        check_derived_state(record)  # every generate(): the K-mode buffers still fit the weights (one read of each)
    original(self, generation_config, model_kwargs, *args, **kwargs)
    key, cache = cache_entry(model_kwargs)
    if cache is None:
        return
    if user_cache is not None:
        inner = self_attention_part(cache)
        if not isinstance(inner, SlimCache):
            raise TypeError(
                f"this model is slimified but generate() got a {type(cache).__name__} as its cache; pass no cache "
                "(generate builds a slim one), an hf_slim.SlimCache, or unslimify the model first"
            )
        inner.derived_state_checked = True
        return
    self_cache = self_attention_part(cache)
    if type(self_cache) is DynamicCache:
        slim = record.new_cache()
    elif type(self_cache) is StaticCache:
        slim = record.new_cache(max_cache_len=self_cache.get_max_length())
    else:
        raise NotImplementedError(f"hf_slim cannot replace a {type(cache).__name__} prepared by generate()")
    if generation_config.is_assistant:
        slim.activate_past_recording()
    self_attention_part(slim).derived_state_checked = True  # checked above, before this generate()
    model_kwargs[key] = slim
