"""Public entry points: ``slimify``, ``unslimify``, ``is_slim``, ``slimified``.

slimify validates everything and computes everything first (architecture, attention implementation, K-mode weights
and calibration), then applies a list of reversible instance patches all at once; a failure part-way reverts the
ones already applied, so the model is either fully slim or exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

from . import __version__
from ._compat import check_contracts
from .attention import SlimAttentionState
from .cache import CacheOwner, SlimCache, SlimLayout
from .generation import CONTRACTS as GENERATION_CONTRACTS
from .kmode import (
    KModeWeights,
    KSourceStamp,
    RotaryRoundTrip,
    SingularKeyProjection,
    choose_residual_rank,
    solve_layer_k_mode,
)
from .patching import (
    BufferPatch,
    InstancePatch,
    PatchedMethod,
    apply_all,
    forward_attribute,
    resident_weights,
    revert_all,
)
from .registry import UnsupportedModelError, architecture_for
from .rope import rotary_state_kept
from .sites import AttentionSite

MODES = ("auto", "input", "k")
SUPPORTED_ATTENTION = ("eager", "sdpa")

logger = logging.getLogger(__name__)


class SlimFallbackWarning(UserWarning):
    """Some layers asked for the K cache keep the input cache (RoPE models: the model's own K and V) because no K or
    K+R cache (``r <= d/2``) is exact there."""


@dataclass
class SlimRecord:
    """Everything slimify did to one model: the settings, per-layer modes and numbers, and the patches to undo."""

    requested_mode: str
    layer_modes: dict[str, str]
    calibration: dict[str, dict]
    num_cache_layers: int
    is_encoder_decoder: bool
    kv_layers: tuple[int, ...] = ()
    version: str = __version__
    #: residual rank r of every K-mode layer (cache width e + r; 0 is the plain K cache), see hf_slim.kmode
    residual_ranks: dict[str, int] = field(default_factory=dict)
    patches: list = field(default_factory=list, repr=False)
    owner: CacheOwner = field(default_factory=CacheOwner, repr=False)
    #: why this architecture cannot use a static cache (its patch module's ``STATIC_CACHE_REFUSAL``), or None
    static_cache_refusal: str | None = None

    def new_cache(self, max_cache_len: int | None = None) -> SlimCache | EncoderDecoderCache:
        """A fresh, empty slim cache for this model (encoder-decoder models get no cross-attention cache);
        ``max_cache_len`` makes it static (preallocated); ``kv_layers`` (RoPE layers in mode ``"kv"``) hold K/V.
        Layers adopt each writer's layout."""
        cache = SlimCache(self.num_cache_layers, max_cache_len=max_cache_len, kv_layers=self.kv_layers)
        if self.is_encoder_decoder:
            return EncoderDecoderCache(cache, SlimCache(0))
        return cache


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (slimify patches that one), or ``model`` itself."""
    peft = sys.modules.get("peft")  # a PeftModel can only exist if peft was imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def is_slim(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a PEFT wrapper) is currently slimified."""
    return "_hf_slim_record" in vars(_unwrapped(model))


def slim_record(model: torch.nn.Module) -> SlimRecord:
    """The :class:`SlimRecord` of a slimified model."""
    if not is_slim(model):
        part = _slim_part(model)
        if part is not None:
            raise ValueError(
                f"this module is not slimified itself, but part of it ({part!r}) belongs to a slimify() call on "
                "another model: call hf_slim.unslimify on the model that was passed to slimify"
            )
        raise ValueError("this model is not slimified; call hf_slim.slimify(model) first")
    return vars(_unwrapped(model))["_hf_slim_record"]


def _slim_part(model: torch.nn.Module) -> str | None:
    """The name of a submodule of ``model`` that a slimify() call patched, or None."""
    for name, module in _unwrapped(model).named_modules():
        if "hf_slim" in vars(module) or "_hf_slim_record" in vars(module):
            return name or type(module).__name__
    return None


def slimify(
    model: torch.nn.Module,
    mode: str = "auto",
    *,
    calibration_inputs: dict | None = None,
    layer_modes: dict[str, str] | None = None,
    residual_ranks: dict[str, int] | None = None,
    _k_weights: dict[str, KModeWeights] | None = None,
) -> torch.nn.Module:
    """Patch every supported attention layer of ``model`` in place to use a slim cache, and return the model.

    After this, ``model.generate(...)``, ``model(...)`` and pipelines build and use a slim cache by themselves.

    Parameters
    ----------
    model:
        a transformers model of a supported architecture (see ``hf_slim.supported_model_types()``).
    mode:
        ``"input"`` caches each layer's attention input X (exact, no inverse; not with RoPE); ``"k"`` caches the
        keys plus the ``r`` input directions W_K barely carries (K+R cache, width ``e + r``, see
        :mod:`hf_slim.kmode`) and rebuilds values from them, with per layer the smallest ``r`` for which a
        calibration in the model's dtype shows it is as exact as the unmodified model; layers that would need
        ``r > d/2`` keep the input cache, with a :class:`SlimFallbackWarning` (one factorisation of every W_K,
        7-10 s per d = 4096 layer on two idle CPU cores, a quarter to a third of one float64 SVD; with a progress
        bar over the layers). ``"auto"`` picks
        ``"input"`` wherever the architecture allows it. Logs one line at INFO (logger ``hf_slim``) saying what
        the model got: layers per mode, residual ranks and the cache ratio against K/V at its maximum length.
        Cross-attention always reads the encoder output directly (no cache) whatever the mode.
    calibration_inputs:
        keyword arguments for one forward pass of the unmodified model whose attention inputs calibrate the K mode
        (real text or audio: random activations understate the K-cache error 3-10x). Defaults to the
        architecture's own calibration batch.
    layer_modes:
        force each layer's mode instead of choosing it (``{site name: "input" | "k" | "encoder"}``, exactly the keys
        of ``slim_record(model).layer_modes``), e.g. to reproduce an exported model: no calibration runs, K layers
        get ``W_KV`` solved from the live weights. Names or modes that do not fit the model raise ``ValueError``.
        (``_k_weights`` is for :func:`hf_slim.load_slim`: verified precomputed K-mode weights, skipping the solve.)
    residual_ranks:
        with ``layer_modes``: the residual rank ``r`` (``0 <= r <= d``) of each forced K layer (default 0, the plain
        K cache), e.g. to reproduce an exported model or to test a given ``r``. No calibration checks it.

    Raises
    ------
    UnsupportedModelError
        for architectures or configurations slim attention cannot serve (GQA/MQA, RoPE with the input mode, an
        unsupported attention implementation); the model is left untouched.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    wrapper, model = model, _unwrapped(model)
    if is_slim(model):
        record = slim_record(model)
        if (layer_modes is not None and layer_modes != record.layer_modes) or (
            residual_ranks is not None and residual_ranks != record.residual_ranks
        ):
            raise ValueError("model is already slimified with other layer modes; call hf_slim.unslimify(model) first")
        if record.requested_mode != mode:
            raise ValueError(
                f"model is already slimified with mode={record.requested_mode!r}; call hf_slim.unslimify(model) "
                f"before slimify(model, mode={mode!r})"
            )
        return wrapper
    part = _slim_part(model)
    if part is not None:
        raise ValueError(
            f"part of this model ({part!r}) is already slimified, by a slimify() call on it or on a model that "
            "contains it; unslimify that first (one slimify per model: nested slim states could not be undone in "
            "every order)"
        )
    config = model.config
    architecture = architecture_for(config, mode)
    _check_attention_implementation(model)
    patch_module = architecture.load()
    check_contracts((*GENERATION_CONTRACTS, *getattr(patch_module, "CONTRACTS", ())), model)  # transformers drift
    sites: list[AttentionSite] = patch_module.attention_sites(model)
    if not sites:
        raise UnsupportedModelError(f"found no attention layers to patch in {type(model).__name__}")
    resolved = ("k" if architecture.positions == "rope" else "input") if mode == "auto" else mode

    if residual_ranks is not None and layer_modes is None:
        raise ValueError("residual_ranks forces the rank of forced K layers: pass layer_modes too")
    if layer_modes is not None:
        layer_modes, calibration, k_weights = _forced_layer_modes(
            sites, architecture, layer_modes, residual_ranks or {}, _k_weights
        )
    else:
        layer_modes, calibration, k_weights = _choose_layer_modes(
            model, patch_module, sites, resolved, calibration_inputs, fallback_mode(architecture)
        )
    self_sites = [site for site in sites if site.kind == "self"]
    record = SlimRecord(
        requested_mode=mode,
        layer_modes=layer_modes,
        calibration=calibration,
        num_cache_layers=1 + max((site.layer_idx for site in self_sites), default=-1),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        static_cache_refusal=getattr(patch_module, "STATIC_CACHE_REFUSAL", None),
        residual_ranks={name: weights.residual_rank for name, weights in k_weights.items()},
        kv_layers=tuple(site.layer_idx for site in self_sites if layer_modes[site.name] == "kv"),
    )
    patches = _site_patches(sites, layer_modes, calibration, k_weights, record.owner)
    for owner in patch_module.cache_owners(model):
        patches.append(InstancePatch(owner, forward_attribute(owner), _forward_with_slim_cache(owner, record)))
    if hasattr(model, "_prepare_cache_for_generation"):
        patches.append(InstancePatch(model, "_prepare_cache_for_generation", _prepare_slim_cache(model, record)))
    patches.extend(getattr(patch_module, "extra_patches", lambda model: [])(model))
    from .export import export_patches  # export imports this module

    patches.extend(export_patches(model, record))
    patches.append(InstancePatch(model, "_hf_slim_record", record))
    record.patches = patches
    apply_all(patches)
    from .memory import slim_summary  # memory imports this module

    logger.info(slim_summary(model))  # what the user got: layers per mode, ranks, the cache ratio
    return wrapper


def unslimify(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`slimify`: original forwards back, added buffers gone, weights untouched (bit-identical)."""
    revert_all(slim_record(model).patches)
    return model


@contextlib.contextmanager
def slimified(model: torch.nn.Module, mode: str = "auto", **kwargs) -> Iterator[torch.nn.Module]:
    """Context manager form: the model is slim inside the block and restored after it (if it was not slim before)."""
    was_slim = is_slim(model)
    slimify(model, mode, **kwargs)
    try:
        yield model
    finally:
        if not was_slim:
            unslimify(model)


def _check_attention_implementation(model: torch.nn.Module) -> None:
    configs = [model.config] + [getattr(model.config, name) for name in model.config.sub_configs]
    for config in configs:
        implementation = getattr(config, "_attn_implementation", None)
        if implementation is not None and implementation not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attn_implementation={implementation!r} is not supported by hf_slim yet; load the model with "
                f"attn_implementation='sdpa' or 'eager' (supported: {', '.join(SUPPORTED_ATTENTION)})"
            )


def fallback_mode(architecture) -> str:
    """What a self-attention layer keeps where the K cache is refused: the exact input cache, or for RoPE models
    (where the input cache cannot apply) the model's own keys and values (``"kv"``: a mixed cache)."""
    return "kv" if architecture.positions == "rope" else "input"


def _choose_layer_modes(model, patch_module, sites, resolved, calibration_inputs, fallback):
    """Decide each site's mode; for the K mode solve W_KV and calibrate on real activations, before any patching."""
    layer_modes, calibration, k_weights = {}, {}, {}
    for site in sites:
        layer_modes[site.name] = "encoder" if site.kind == "cross" else "input"
    if resolved != "k":
        return layer_modes, calibration, k_weights
    self_sites = [site for site in sites if site.kind == "self"]
    refused = [f"{site.name}: {site.k_mode_refusal}" for site in self_sites if site.k_mode_refusal]
    for site in self_sites:
        layer_modes[site.name] = fallback
    self_sites = [site for site in self_sites if not site.k_mode_refusal]
    if not self_sites:
        _warn_fallback(refused, fallback)
        return layer_modes, calibration, k_weights
    if calibration_inputs is None:
        calibration_inputs = patch_module.default_calibration_inputs(model)
    _check_calibration_inputs(calibration_inputs)
    activations = _collect_attention_inputs(model, self_sites, calibration_inputs)
    dtype = next(model.parameters()).dtype
    bar = _progress(self_sites, "hf_slim: K+R calibration")
    for site in bar:
        bar.set_postfix_str(site.name)  # the layer being calibrated, and the rank being tried

        def on_rank(rank: int, name: str = site.name) -> None:
            bar.set_postfix_str(f"{name}, r = {rank}")

        with resident_weights(site.module):  # accelerate offload: solve from the real weights, on their device
            projections = site.projections(site.module)
            try:
                round_trip = (
                    None if site.rotary is None else RotaryRoundTrip(site.num_heads, site.head_dim, site.rotary)
                )
                choice = choose_residual_rank(projections, activations[site.name], dtype, round_trip, on_rank)
            except SingularKeyProjection as error:
                refused.append(f"{site.name}: {error}")
                continue
            except ValueError as error:
                raise ValueError(f"{site.name}: {error}") from error
        numbers = calibration[site.name] = choice.numbers
        if choice.weights is not None:
            layer_modes[site.name] = "k"
            k_weights[site.name] = choice.weights
        else:
            refused.append(
                f"{site.name}: even with r = {numbers['residual_rank']} (cap {choice.max_rank}; cache ratio "
                f"{numbers['cache_ratio']:.2f}x) V rebuilt "
                f"from {dtype} keys has relative error {numbers['k_error']:.2e} vs {numbers['vanilla_error']:.2e} for "
                f"the unmodified model (cond(W_K) = {numbers['cond_w_k']:.2e})"
            )
    _warn_fallback(refused, fallback)
    return layer_modes, calibration, k_weights


def _warn_fallback(refused: list[str], fallback: str) -> None:
    if refused:
        kept = "the model's own keys and values" if fallback == "kv" else "the (exact) input cache"
        warnings.warn(
            f"K cache refused, these layers keep {kept}:\n  " + "\n  ".join(refused),
            SlimFallbackWarning,
            stacklevel=4,
        )


def _forced_layer_modes(sites, architecture, layer_modes, residual_ranks, k_weights):
    """Check caller-given per-layer modes (and K-layer ranks) against the model's sites and get W_KV for the K layers
    (no calibration)."""
    by_name = {site.name: site for site in sites}
    unknown, missing = sorted(set(layer_modes) - set(by_name)), sorted(set(by_name) - set(layer_modes))
    if unknown or missing:
        raise ValueError(
            f"layer_modes do not match this model's attention layers (unknown: {unknown}, missing: {missing}); "
            f"its layers are {list(by_name)}"
        )
    not_k = sorted(name for name in residual_ranks if layer_modes.get(name) != "k")
    if not_k:
        raise ValueError(f"residual_ranks names layers that are not forced to 'k': {not_k}")
    weights = {}
    for name, site in by_name.items():
        mode, allowed = layer_modes[name], (("encoder",) if site.kind == "cross" else ("input", "k"))
        if mode == "input" and architecture.positions == "rope":
            raise UnsupportedModelError(f"layer_modes[{name!r}] = 'input' cannot be used with RoPE; use 'k' or 'kv'")
        if architecture.positions == "rope":
            allowed = ("k", "kv")
        if mode not in allowed:
            raise ValueError(f"layer_modes[{name!r}] = {mode!r}: a {site.kind}-attention layer takes one of {allowed}")
        if mode == "k" and site.k_mode_refusal:
            raise ValueError(f"layer_modes[{name!r}] = 'k' is not exact here: {site.k_mode_refusal}; use 'kv'")
        rank = residual_ranks.get(name, 0)
        if mode == "k" and k_weights is not None and name in k_weights:
            weights[name] = k_weights[name]
            if name in residual_ranks and rank != weights[name].residual_rank:
                raise ValueError(f"{name}: residual rank {rank} != {weights[name].residual_rank} of its K weights")
        elif mode == "k":
            try:
                weights[name] = solve_layer_k_mode(site, rank)
            except ValueError as error:
                raise ValueError(f"layer_modes[{name!r}] = 'k': {error}") from error
    # K layers record the dtype they are set up in, as a calibration would: load_slim checks it
    calibration = {name: {"dtype": str(by_name[name].projections(by_name[name].module).w_k.dtype)} for name in weights}
    return {site.name: layer_modes[site.name] for site in sites}, calibration, weights


def _check_calibration_inputs(calibration_inputs) -> None:
    """``calibration_inputs`` must be the keyword arguments of one forward pass: a dict of names to tensors."""
    example = "e.g. calibration_inputs={'input_ids': tokenizer(text, return_tensors='pt').input_ids}"
    if not isinstance(calibration_inputs, Mapping):
        raise TypeError(
            "calibration_inputs must be a dict of forward() keyword arguments, got a "
            f"{type(calibration_inputs).__name__}; {example}"
        )
    for key, value in calibration_inputs.items():
        if not isinstance(key, str):
            raise TypeError(f"calibration_inputs keys must be argument names (str), got {key!r}; {example}")
        if key in ("use_cache", "past_key_values"):
            raise ValueError(f"calibration_inputs must not set {key!r}: the calibration runs one pass without a cache")
        if not isinstance(value, torch.Tensor) and key not in ("encoder_outputs",):
            raise TypeError(f"calibration_inputs[{key!r}] is a {type(value).__name__}, expected a tensor; {example}")


@torch.no_grad()
def _collect_attention_inputs(model, sites, calibration_inputs) -> dict[str, torch.Tensor]:
    """Run the unmodified model once and keep each site's attention input, ``(tokens, d_model)``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:

        def hook(module, args, kwargs, name=site.name):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[name] = hidden.detach().reshape(-1, hidden.shape[-1])

        handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with rotary_state_kept(model):  # dynamic NTK / longrope: the pass must not change the frequencies
            model(**calibration_inputs, use_cache=False)
    except Exception as error:  # the model's own error, often deep inside: say which argument is at fault
        shapes = {key: tuple(value.shape) for key, value in calibration_inputs.items() if hasattr(value, "shape")}
        raise ValueError(
            f"the calibration forward pass failed with calibration_inputs of shapes {shapes}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Pass the keyword arguments "
            f"of one forward pass of {type(model).__name__} (real text or audio), or none for the default"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [site.name for site in sites if site.name not in captured]
    if missing:
        raise ValueError(f"calibration forward never reached {missing}; pass calibration_inputs that run the decoder")
    return captured


def _site_patches(sites, layer_modes, calibration, k_weights, owner: CacheOwner) -> list:
    patches = []
    for site in sites:
        module, mode = site.module, layer_modes[site.name]
        if mode == "kv":  # the model's own attention and K/V (a K/V layer of the mixed cache)
            continue
        projections = functools.partial(site.projections, module)
        with resident_weights(module):
            k_source = KSourceStamp.of(projections()) if mode == "k" else None
            key_scale = mode == "k" and projections().key_norm is not None  # keys normalised per token: keep s
        state = SlimAttentionState(
            mode=mode,
            layer_idx=site.layer_idx,
            num_heads=site.num_heads,
            head_dim=site.head_dim,
            projections=projections,
            calibration=calibration.get(site.name, {}),
            name=site.name,
            layout=SlimLayout(owner, mode) if site.kind == "self" else None,
            k_source=k_source,
            residual_rank=k_weights[site.name].residual_rank if mode == "k" else 0,
            rotary=site.rotary if mode == "k" else None,
            rotary_source=site.rotary_source if mode == "k" else None,
            key_scale=key_scale,
        )
        patches.append(InstancePatch(module, "hf_slim", state))
        if mode == "k":
            weights = k_weights[site.name]
            dtype = state.projections().w_v.dtype
            patches.append(BufferPatch(module, "hf_slim_w_kv", weights.w_kv.to(dtype)))  # (e + r, e)
            patches.append(BufferPatch(module, "hf_slim_v_offset", weights.v_offset.to(dtype)))  # (e,)
            if weights.residual_rank:
                patches.append(BufferPatch(module, "hf_slim_z_proj", weights.z_proj.to(dtype)))  # (d, r)
        forward = PatchedMethod(_run_resident, module, site.forward, signature_of=site.forward)
        patches.append(InstancePatch(module, forward_attribute(module), forward))
    return patches


def _progress(items: list, desc: str):
    """A progress bar over ``items`` on stderr, none when stderr is not a terminal (tqdm's ``disable=None``); it is
    transformers' tqdm, so ``transformers.utils.logging.disable_progress_bar()`` silences it."""
    from transformers.utils.logging import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False, disable=None)


def _run_resident(module: torch.nn.Module, forward, *args, **kwargs):
    """Run the slim ``forward`` with the module's offloaded weights kept real: it reads projection weights of
    submodules after their own (offloading) forwards returned.

    Also the one place that refuses an attention implementation switched after slimify
    (``model.set_attn_implementation("flex_attention")``): the slim paths only understand eager/SDPA masks.
    """
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and implementation not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"this slim model now uses attn_implementation={implementation!r} (set after slimify); hf_slim supports "
            f"{', '.join(SUPPORTED_ATTENTION)}: call model.set_attn_implementation('sdpa'), or "
            "hf_slim.unslimify(model) to use another implementation"
        )
    with resident_weights(module):
        return forward(module, *args, **kwargs)


def _use_cache_requested(owner: torch.nn.Module, arguments: dict) -> bool:
    use_cache = arguments.get("use_cache")
    if use_cache is None:
        use_cache = getattr(owner.config, "use_cache", False)
    return bool(use_cache) and not (getattr(owner, "gradient_checkpointing", False) and owner.training)


def _forward_with_slim_cache(owner: torch.nn.Module, record: SlimRecord) -> PatchedMethod:
    """Wrap the forward that would create a DynamicCache so that it starts from a slim cache instead.

    The forward's parameter names are read once here (not at every call: this wrapper runs at every decode step).
    """
    names = tuple(inspect.signature(type(owner).forward).parameters)[1:]  # after self
    return PatchedMethod(_slim_cache_owner_forward, owner, record, names, signature_of=type(owner).forward)


def _slim_cache_owner_forward(owner: torch.nn.Module, record: SlimRecord, names: tuple[str, ...], *args, **kwargs):
    original = type(owner).forward  # what forward_attribute(owner) held: the class forward (accelerate's hook wraps us)
    position = names.index("past_key_values")
    arguments = {**dict(zip(names, args, strict=False)), **kwargs}
    cache = arguments.get("past_key_values")
    if isinstance(cache, SlimCache):
        cache.adopt_layout(record.num_cache_layers, record.kv_layers)  # a user's SlimCache() for a mixed model
    if cache is None and _use_cache_requested(owner, arguments):
        cache = record.new_cache()
    elif record.is_encoder_decoder and type(cache) is SlimCache:
        # a bare SlimCache for an encoder-decoder model: pair it with an empty cross-attention cache, as generate()
        # does (Whisper's decoder would otherwise replace an empty one by a K/V EncoderDecoderCache)
        cache = EncoderDecoderCache(cache, SlimCache(0))
    else:
        return _ending_step(cache, original(owner, *args, **kwargs))
    if len(args) > position:
        args = (*args[:position], cache, *args[position + 1 :])
    else:
        kwargs["past_key_values"] = cache
    return _ending_step(cache, original(owner, *args, **kwargs))


def _ending_step(cache, output):
    """Drop the slim cache's per-step working state (the rotary table of the step) once the forward is done: it is
    not part of the cache and must not hold memory between steps."""
    inner = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if isinstance(inner, SlimCache):
        inner.end_step()
    return output


def _prepare_slim_cache(model: torch.nn.Module, record: SlimRecord) -> PatchedMethod:
    """generate() hook: let transformers prepare its cache, then swap its fresh DynamicCache for a slim one."""
    return PatchedMethod(_prepare_slim_cache_for_generation, model, record)


def _prepare_slim_cache_for_generation(self, record: SlimRecord, generation_config, model_kwargs, *args, **kwargs):
    original = type(self)._prepare_cache_for_generation
    user_cache = model_kwargs.get("past_key_values")
    if user_cache is None and generation_config.cache_implementation not in (None, "dynamic", "static"):
        raise NotImplementedError(
            f"hf_slim does not support cache_implementation={generation_config.cache_implementation!r}; use "
            "the default (dynamic) or 'static', which hf_slim replaces by the matching slim cache"
        )
    if generation_config.cache_implementation == "static" and record.static_cache_refusal:
        raise NotImplementedError(f"cache_implementation='static': {record.static_cache_refusal}")
    original(self, generation_config, model_kwargs, *args, **kwargs)
    cache = model_kwargs.get("past_key_values")
    if cache is None:
        return
    if user_cache is not None:
        inner = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        if not isinstance(inner, SlimCache):
            raise TypeError(
                f"this model is slimified but generate() got past_key_values={type(cache).__name__}; pass no "
                "cache (generate builds a slim one), an hf_slim.SlimCache, or unslimify the model first"
            )
        return
    self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if type(self_cache) is DynamicCache:
        slim = record.new_cache()
    elif type(self_cache) is StaticCache:
        slim = record.new_cache(max_cache_len=self_cache.get_max_length())
    else:
        raise NotImplementedError(f"hf_slim cannot replace a {type(cache).__name__} prepared by generate()")
    if generation_config.is_assistant:
        slim.activate_past_recording()
    model_kwargs["past_key_values"] = slim
