"""Everything that depends on which transformers release is installed, in one place.

hf_slim replaces a few attention forwards adapted from transformers and hooks two generation helpers, so it relies on
internals that transformers may change between releases. This module holds, per concern:

- the tested range and the import-time check (:func:`check_transformers_version`): older than the minimum is a
  one-line ``ImportError``, newer than the newest tested release is one :class:`UntestedTransformersWarning`;
- the generation helpers whose calling convention changed inside the range (:func:`generic_expand_inputs`);
- the contracts of the adapted forwards (:class:`Contract`, :func:`check_contracts`): the parameters and module
  attributes each adapted forward relies on, checked before slimify changes anything, so that a transformers release
  that changes them makes slimify refuse with a clear error instead of computing wrong outputs.

A patch module in ``patches/`` declares ``CONTRACTS = (Contract(...), ...)``; slimify checks the ones whose class
occurs in the model. New families use the same mechanism: one ``Contract`` per original method they adapt or call.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from packaging.version import Version

if TYPE_CHECKING:
    import torch

#: Oldest transformers release hf_slim supports: T5's attention interface (``eager_attention_forward`` in
#: ``modeling_t5``) exists from 5.15 on.
MIN_TRANSFORMERS = Version("5.15.0")
#: Newest transformers minor release the suite has run on (every patch release of it counts as tested).
NEWEST_TESTED_TRANSFORMERS = Version("5.25")
#: The tested range as a pip specifier (pyproject.toml requires the same range).
TESTED_RANGE = ">=5.15,<5.26"


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the newest release hf_slim was tested with."""


class TransformersContractError(RuntimeError):
    """An original method hf_slim adapts or calls is not what the adaptation relies on (an untested transformers)."""


def check_transformers_version(installed: str | None = None) -> None:
    """Check the installed transformers against the tested range, once at import.

    Older than :data:`MIN_TRANSFORMERS` raises ``ImportError`` (the patches import names that do not exist there).
    Newer than :data:`NEWEST_TESTED_TRANSFORMERS` warns once with :class:`UntestedTransformersWarning`: hf_slim
    usually works there, and the contract checks make slimify refuse loudly where an adapted forward no longer fits.
    ``HF_SLIM_SKIP_VERSION_CHECK=1`` silences that warning (not the error).

    Parameters
    ----------
    installed:
        the version to check; defaults to ``transformers.__version__``.
    """
    if installed is None:  # the imported module's version if it is imported, else the package's (no import)
        module = sys.modules.get("transformers")
        installed = module.__version__ if module is not None else metadata.version("transformers")
    version = Version(installed)
    if version.release[:3] < MIN_TRANSFORMERS.release:
        raise ImportError(
            f"hf_slim needs transformers>={MIN_TRANSFORMERS} but transformers {installed} is installed; "
            f'run: pip install "transformers{TESTED_RANGE}"'
        )
    skip = os.environ.get("HF_SLIM_SKIP_VERSION_CHECK") == "1"
    if version.release[:2] > NEWEST_TESTED_TRANSFORMERS.release[:2] and not skip:
        warnings.warn(
            f"hf_slim is tested with transformers{TESTED_RANGE} and transformers {installed} is installed: slimify "
            "refuses any attention layer whose transformers code changed in a way it checks, but outputs on this "
            f'version are not verified by hf_slim\'s tests (pip install "transformers{TESTED_RANGE}" to be safe; '
            "HF_SLIM_SKIP_VERSION_CHECK=1 silences this warning)",
            UntestedTransformersWarning,
            stacklevel=2,
        )


# --- the cache argument, by role (transformers renames it: past_key_values up to 5.23, cache from 5.24) -----------

#: Marks the cache parameter in :attr:`Contract.parameters`: any name, the parameter transformers passes the cache as.
CACHE = "<cache>"


def _annotation_is_cache(annotation: object) -> bool:
    """Whether a parameter annotation names a transformers ``Cache`` (``Cache | None``, ``Optional[Cache]``, or the
    same as a string)."""
    from transformers.cache_utils import Cache

    if annotation is inspect.Parameter.empty or annotation is None:
        return False
    if isinstance(annotation, str):
        return re.search(r"\b\w*Cache\b", annotation) is not None
    if isinstance(annotation, type):
        return issubclass(annotation, Cache)
    return any(_annotation_is_cache(argument) for argument in typing.get_args(annotation))


def generation_cache_names() -> tuple[str, ...]:
    """The keyword names transformers' generate() passes caches under, as transformers itself lists them
    (``transformers.generation.utils.ALL_CACHE_NAMES``: the default first)."""
    from transformers.generation import utils

    return tuple(getattr(utils, "ALL_CACHE_NAMES", ()))


def cache_parameter(function: Callable) -> str | None:
    """The name of the parameter of ``function`` that takes the cache, read from the function itself.

    Why: transformers renamed it (``past_key_values`` -> ``cache`` in 5.24, with the old name deprecated), and may
    again; hf_slim reads the name the installed code declares instead of keeping a table of names. The cache
    parameter is the one annotated as a ``Cache``; for the forwards that carry no annotation, the one named as
    generate() names caches (:func:`generation_cache_names`). None if there is neither.
    """
    parameters = list(inspect.signature(function).parameters.values())
    for parameter in parameters:
        if _annotation_is_cache(parameter.annotation):
            return parameter.name
    names = generation_cache_names()
    for parameter in parameters:
        if parameter.name in names:
            return parameter.name
    return None


def positional_parameters(method: Callable) -> tuple[str, ...]:
    """The names of a method's parameters that can be passed by position, after ``self``."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(method).parameters.values() if p.kind in positional)[1:]


def with_cache(cache: object) -> dict:
    """Keyword arguments that hand ``cache`` to a model's forward under the name the installed transformers uses
    (``model(input_ids, **with_cache(cache))``), for code that drives forwards step by step."""
    return {generation_cache_names()[0]: cache}


def find_cache(args: tuple, kwargs: Mapping) -> object | None:
    """The first transformers ``Cache`` among a call's arguments (by type, whatever the argument is named)."""
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def cache_entry(mapping: Mapping) -> tuple[str | None, object | None]:
    """``(key, cache)`` of the transformers ``Cache`` held in a mapping (generate()'s ``model_kwargs``, a model
    output), or ``(None, None)``: found by type, so hf_slim needs no name for it."""
    from transformers.cache_utils import Cache

    for key, value in mapping.items():
        if isinstance(value, Cache):
            return key, value
    return None, None


def returned_cache(output: object) -> object | None:
    """The cache a model or generate() output carries (``output.past_key_values`` up to transformers 5.23,
    ``output.cache`` from 5.24), found by type; None if it carries none."""
    if isinstance(output, Mapping):
        return cache_entry(output)[1]
    return None


# --- generation helpers -----------------------------------------------------------------------------------------


def generic_expand_inputs(model: torch.nn.Module, **kwargs) -> tuple:
    """Call transformers' own ``_expand_inputs_for_generation`` of ``model``'s class (not an instance patch of it).

    It is a ``staticmethod`` up to transformers 5.17 and a method taking ``self`` from 5.18 on; this calls either.

    Parameters
    ----------
    model:
        the model whose class provides the generic implementation.
    kwargs:
        ``expand_size``, ``is_encoder_decoder``, ``input_ids`` and the model kwargs, as generate() passes them.
    """
    for klass in type(model).__mro__:
        if "_expand_inputs_for_generation" in vars(klass):
            generic = vars(klass)["_expand_inputs_for_generation"]
            break
    else:
        raise TransformersContractError(
            f"{type(model).__name__} has no _expand_inputs_for_generation (transformers changed generate()); "
            f"hf_slim supports transformers{TESTED_RANGE}"
        )
    if isinstance(generic, staticmethod):
        return generic.__func__(**kwargs)
    return generic(model, **kwargs)


# --- contracts of the adapted forwards ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What hf_slim relies on in one original transformers method: its parameters and the module's attributes.

    Attributes
    ----------
    owner:
        the transformers class whose method hf_slim adapts (or wraps, or calls).
    method:
        the method's name (``"forward"`` for attention layers).
    parameters:
        the method's leading parameter names after ``self``, in order: a replacement forward receives the arguments
        callers pass for these, positionally or by name, so a renamed, added or reordered one would be misread.
        :data:`CACHE` stands for the cache parameter, whatever transformers names it (:func:`cache_parameter`).
    keywords:
        parameter names that must exist anywhere in the signature (read by name, e.g. ``use_cache``); :data:`CACHE`:
        the method takes a cache.
    attributes:
        instance attributes the adapted code reads (weights, sizes, flags), checked on every instance in the model.
    where:
        where the method is looked up when not on ``owner``: a module, for a module-level function that an instance
        patch stands in for and must take the arguments of (``create_masks_for_generate`` in
        ``transformers.generation.utils``, which generate() calls unless the model has a method of that name).
        ``owner`` still says when the contract applies.
    absent:
        parameter names the method must *not* take: one that comes back means the release hands the layer something
        the route leaves to the model (Falcon's ``alibi``, which the routed Falcon relies on the mask to carry).
    calls:
        names the method's source must use (:data:`ROUTED_CALLS` for a routed forward: the attention interface and
        the cache update), checked in the installed source: a release that computes attention inline again is
        refused before anything is patched, instead of at the first forward.
    """

    owner: type
    method: str
    parameters: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    where: object | None = None
    absent: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()

    def signature_problems(self) -> list[str]:
        """How the method's signature differs from the contract (empty when it holds)."""
        source = self.owner if self.where is None else self.where
        name = f"{source.__name__}.{self.method}"
        function = getattr(source, self.method, None)
        if function is None:
            return [f"{name} does not exist"]
        names = [p.name for p in inspect.signature(function).parameters.values() if p.kind != p.VAR_KEYWORD]
        names = names[1:] if names and names[0] == "self" else names  # a staticmethod has no self
        cache = cache_parameter(function)
        leading = names[: len(self.parameters)]
        fits = len(leading) == len(self.parameters) and all(
            expected == name or (expected == CACHE and (cache is None or name == cache))  # unmarked: by position
            for expected, name in zip(self.parameters, leading, strict=False)
        )
        problems = []
        if not fits:
            shown = ", ".join("<the cache>" if p == CACHE else p for p in self.parameters)
            problems.append(f"{name} takes ({', '.join(names)}), hf_slim expects it to start with ({shown})")
        missing = [k for k in self.keywords if (cache is None if k == CACHE else k not in names)]
        if missing:
            shown = ", ".join("a cache" if k == CACHE else k for k in missing)
            problems.append(f"{name} has no parameter(s) {shown}")
        present = [k for k in self.absent if k in names]
        if present:
            problems.append(f"{name} takes {', '.join(present)}, which hf_slim expects the model to pass otherwise")
        unused = [call for call in self.calls if call not in _source(function)]
        if unused:
            problems.append(f"{name} does not use {', '.join(unused)} (it computes attention itself)")
        return problems

    def attribute_problems(self, instance: object) -> list[str]:
        """Which of the contract's attributes ``instance`` lacks (empty when it has them all)."""
        missing = [name for name in self.attributes if not hasattr(instance, name)]
        return [f"{type(instance).__name__} has no attribute(s) {', '.join(missing)}"] if missing else []


#: What a forward served through the extension points must use (:mod:`hf_slim.interface`): the attention function
#: registry it looks hf_slim's function up in, and the cache update that hands hf_slim's function the slim step.
ROUTED_CALLS = ("ALL_ATTENTION_FUNCTIONS", ".update(")


def _source(function: Callable) -> str:
    """The installed source of ``function`` (decorators unwrapped), or "" where Python keeps none."""
    try:
        return inspect.getsource(inspect.unwrap(function))
    except (OSError, TypeError):
        return ""


def routes_attention(owner: type) -> bool:
    """Whether the installed ``owner.forward`` computes attention through transformers' attention interface
    (:data:`ROUTED_CALLS`), so that hf_slim serves it unchanged, or computes it itself (an adapted forward then).

    Why read from the source: families move onto the interface one release at a time (GPT-J in 5.24, Falcon in 5.25),
    and what a patch must do follows what the installed forward does, not a version number.
    """
    forward = getattr(owner, "forward", None)
    return forward is not None and all(call in _source(forward) for call in ROUTED_CALLS)


def forward_contracts(
    forward: Callable,
    attention: tuple[type, ...],
    cache_owners: tuple[type, ...] = (),
    alternatives: tuple[str, ...] = (),
    also_reads: tuple[str, ...] = (),
) -> tuple[Contract, ...]:
    """Contracts for a slim attention ``forward`` adapted from the forwards of the ``attention`` classes, and for the
    ``cache_owners`` whose forwards create the cache.

    Why derived from the slim forward itself: what it relies on is the module attributes it reads (every
    ``self.<name>`` in its source), its parameters up to the cache lining up with the original's (callers pass the
    cache by keyword under the original's name, which :func:`hf_slim.api` maps to ``cache`` by position, or
    positionally), and the mask arriving by its name. Deriving them keeps the contract in step with the code that
    needs it; the check against the installed transformers is what catches drift. ``alternatives``: attributes the
    forward reads only where they exist (one forward serving classes that name a module differently), left out of the
    contract. ``also_reads``: attributes a shared helper the forward calls reads (e.g.
    :data:`hf_slim.cross_attention.DECODER_ATTENTION_READS`).
    """
    names = list(positional_parameters(forward))
    # the cache arrives by keyword under the original's name or by position: the parameters up to it must line up
    leading = (
        tuple(CACHE if name == "cache" else name for name in names[: names.index("cache") + 1])
        if "cache" in names
        else tuple(names[:1])
    )
    keywords = ("attention_mask",) if "attention_mask" in names else ()
    read = set(re.findall(r"\bself\.([A-Za-z_]\w*)", inspect.getsource(forward))) - set(alternatives)
    read |= set(also_reads)
    attributes = tuple(sorted(read))
    contracts = [
        Contract(owner, "forward", parameters=leading, keywords=keywords, attributes=attributes) for owner in attention
    ]
    contracts += [Contract(owner, "forward", keywords=(CACHE, "use_cache")) for owner in cache_owners]
    return tuple(contracts)


def route_contracts(
    route,
    attention: tuple[type, ...],
    cache_owners: tuple[type, ...] = (),
    attributes: tuple[str, ...] = (),
    absent: tuple[str, ...] = (),
    parameters: tuple[str, ...] = (),
) -> tuple[Contract, ...]:
    """Contracts for attention classes served through transformers' extension points (:mod:`hf_slim.interface`):
    their own forward runs, so hf_slim relies only on what it reads of its arguments (a cache parameter, the rotary
    and encoder-output parameters the ``route`` names), on the module ``attributes`` the patch reads (projections,
    sizes), on the forward using the attention interface and the cache update (:data:`ROUTED_CALLS`, read from its
    source before anything is patched), and on it not taking the ``absent`` parameters. That the forward really
    calls ``cache.update`` and the registered attention function is also checked at every call (the slim step must
    be served). ``parameters``: the forward's leading parameters, for one whose cache parameter carries no ``Cache``
    annotation (CTRL's ``layer_past``): :data:`CACHE` marks its position, and the first one is the layer input.
    """
    keywords = tuple(name for name in (route.rotary_parameter, route.encoder_parameter) if name is not None)
    if CACHE not in parameters:
        keywords = (CACHE, *keywords)
    contracts = [
        Contract(
            owner,
            "forward",
            parameters=parameters,
            keywords=keywords,
            attributes=attributes,
            absent=absent,
            calls=ROUTED_CALLS,
        )
        for owner in attention
    ]
    contracts += [Contract(owner, "forward", keywords=(CACHE, "use_cache")) for owner in cache_owners]
    if route.eager is None:  # the model file's own eager function runs the eager prefill
        contracts += [
            Contract(owner, "eager_attention_forward", where=sys.modules[owner.__module__]) for owner in attention
        ]
    return tuple(contracts)


def check_contracts(contracts: Iterable[Contract], model: torch.nn.Module) -> None:
    """Raise :class:`TransformersContractError` if a contract that applies to ``model`` does not hold.

    A contract applies when ``model`` or one of its submodules is an instance of its owner class. Called by slimify
    before it changes anything, so a failed check leaves the model untouched.
    """
    modules = list(model.modules())
    problems: list[str] = []
    for contract in contracts:
        instances = [module for module in modules if isinstance(module, contract.owner)]
        if not instances:
            continue
        found = contract.signature_problems() + [p for m in instances for p in contract.attribute_problems(m)]
        problems += [p for p in dict.fromkeys(found) if p not in problems]  # each problem once, in order
    if problems:
        import transformers

        raise TransformersContractError(
            f"hf_slim cannot patch this model with transformers {transformers.__version__}: "
            + "; ".join(problems)
            + f". The slim forwards are adapted from transformers{TESTED_RANGE}; install a release in that range "
            "(or report the new version to hf_slim)"
        )
