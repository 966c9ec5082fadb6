"""Reversible, instance-level patches.

Why instance-level: ``slimify(model)`` must change only the model it is given (two models of the same class in one
process, one slim and one not, must both stay correct), and ``unslimify`` must put back exactly what was there.
Every change slimify makes is one :class:`InstancePatch`: set an attribute on one object, remember whether the object
had its own value, and undo by restoring it or deleting ours so the class attribute shows through again.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import align_module_device, has_offloaded_params


class _Missing:
    """ "The object had no instance attribute of that name" (a singleton that survives pickling)."""

    def __reduce__(self) -> str:
        return "_MISSING"

    def __repr__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


class PatchedMethod:
    """A method installed on one object: calling it calls ``function(owner, *bound, *args, **kwargs)``.

    Why not a closure or ``types.MethodType``: everything slimify installs must follow the model through
    ``copy.deepcopy`` and ``pickle``/``torch.save``. A closure keeps pointing at the object it was made for (a deep
    copy would still call the original's forward, with the original's weights), and neither closures nor bound
    methods of patch functions pickle. This object holds only ``function`` (module-level, pickled by reference),
    ``owner`` and ``bound`` (plain data that deepcopy and pickle copy together with the owner, so a copy's methods
    act on the copy).

    ``signature_of``: a function whose signature (less its first parameter) this method reports to
    :func:`inspect.signature`, for callers that inspect a forward (generate() validates model kwargs that way).
    """

    def __init__(self, function: Callable, owner: Any, *bound: Any, signature_of: Callable | None = None) -> None:
        self.function = function
        self.owner = owner
        self.bound = bound
        self.signature_of = signature_of

    def __call__(self, *args, **kwargs):
        return self.function(self.owner, *self.bound, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        source = inspect.signature(self.signature_of or self.function)
        skip = 1 if self.signature_of is not None else 1 + len(self.bound)
        return source.replace(parameters=list(source.parameters.values())[skip:])

    @property
    def __self__(self) -> Any:
        """The object this method acts on, as for a bound method."""
        return self.owner

    @property
    def __name__(self) -> str:
        return getattr(self.signature_of or self.function, "__name__", type(self).__name__)

    def __repr__(self) -> str:
        return f"<hf_slim patched method {self.function.__qualname__} of {type(self.owner).__name__}>"


def forward_attribute(module: torch.nn.Module) -> str:
    """Name of the attribute that holds the module's real forward.

    accelerate's ``add_hook_to_module`` moves the original forward to ``_old_forward`` and installs a wrapper as
    ``forward`` that moves weights onto the execution device first; patching ``forward`` itself would bypass that hook
    (and run on meta/offloaded weights), so the patch goes where the hook will call it.
    """
    if hasattr(module, "_hf_hook") and "_old_forward" in vars(module):
        return "_old_forward"
    return "forward"


@contextlib.contextmanager
def resident_weights(module: torch.nn.Module) -> Iterator[None]:
    """Keep the accelerate-offloaded weights of ``module`` and its submodules real (not meta) inside the block.

    Why: accelerate's offload hooks (``device_map`` with ``"cpu"``/``"disk"`` offload) load a module's weights just
    before its own forward and put them back on the meta device right after. A slim forward reads projection weights
    of submodules after those submodules ran (``W_K``, ``W_V`` inside GPT-2's fused ``c_attn``), and slimify solves
    ``W_KV`` from them: both need the real tensors. Inside this block every offload hook under ``module`` has loaded
    its weights onto its execution device and does not offload them again in nested forwards; on exit they return to
    the meta device as after a normal forward. A no-op for modules without offload hooks.
    """
    # a dict lookup first: this runs at every step of every layer, and most modules carry no accelerate hook at all
    hooked = [sub for sub in module.modules() if "_hf_hook" in sub.__dict__ and has_offloaded_params(sub)]
    if not hooked:
        yield
        return
    with contextlib.ExitStack() as stack:
        for sub in hooked:
            stack.enter_context(align_module_device(sub))  # pre_forward now, post_forward (offload) on exit
            stack.enter_context(_offload_paused(sub._hf_hook))
        yield


@contextlib.contextmanager
def _offload_paused(hook) -> Iterator[None]:
    hook.offload = False  # nested hooked forwards neither reload nor offload
    try:
        yield
    finally:
        hook.offload = True


@dataclass
class InstancePatch:
    """Set ``target.name = value`` on one object, undoably."""

    target: Any
    name: str
    value: Any
    _previous: Any = field(default=_MISSING, init=False, repr=False)
    _applied: bool = field(default=False, init=False, repr=False)

    def apply(self) -> None:
        own = vars(self.target) if hasattr(self.target, "__dict__") else {}
        modules = getattr(self.target, "_modules", {})
        buffers = getattr(self.target, "_buffers", {})
        if self.name in modules or self.name in buffers:
            raise RuntimeError(f"refusing to shadow submodule/buffer {self.name!r} of {type(self.target).__name__}")
        self._previous = own.get(self.name, _MISSING)
        object.__setattr__(self.target, self.name, self.value)
        self._applied = True

    def revert(self) -> None:
        if not self._applied:
            return
        if self._previous is _MISSING:
            object.__delattr__(self.target, self.name)
        else:
            object.__setattr__(self.target, self.name, self._previous)
        self._applied = False


@dataclass
class BufferPatch:
    """Register a non-persistent buffer on a module (it follows ``.to()`` / device moves), undoably."""

    module: torch.nn.Module
    name: str
    tensor: torch.Tensor
    _applied: bool = field(default=False, init=False, repr=False)

    def apply(self) -> None:
        if hasattr(self.module, self.name):
            raise RuntimeError(f"{type(self.module).__name__} already has an attribute {self.name!r}")
        self.module.register_buffer(self.name, self.tensor, persistent=False)
        self._applied = True

    def revert(self) -> None:
        if self._applied:
            # keep the buffer as it is now (moved or cast with the model), so that applying again restores it
            self.tensor = self.module._buffers.pop(self.name)
            self._applied = False


def apply_all(patches: list) -> None:
    """Apply every patch or none: on the first failure, revert the ones already applied and re-raise."""
    done = []
    try:
        for patch in patches:
            patch.apply()
            done.append(patch)
    except BaseException:
        for patch in reversed(done):
            patch.revert()
        raise


def revert_all(patches: list) -> None:
    """Revert every patch or none, in reverse order of application.

    Why all-or-nothing: an undo interrupted half-way (Ctrl-C, an error in one revert) would leave some forwards slim
    and others not, a model that is neither. On the first failure the patches already reverted are applied again and
    the error re-raised, so the model is as slim as before and a second call finishes the undo. (Patches whose
    revert already ran are skipped by a second call: each one knows whether it is applied.)
    """
    done = []
    try:
        for patch in reversed(patches):
            if patch._applied:
                patch.revert()
                done.append(patch)
    except BaseException:
        for patch in reversed(done):
            patch.apply()
        raise
