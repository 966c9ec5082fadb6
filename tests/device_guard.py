"""Guards that make a CPU run fail where a GPU run would (tests/test_device.py, scripts/check_device.py).

A model on a GPU crashes on any tensor hf_slim creates without naming a device: it lands on the default device (the
CPU) and meets the model's CUDA tensors ("Expected all tensors to be on the same device"). On a CPU-only machine the
default device *is* the model's device, so the same bug passes every ordinary test. Two guards close that gap:

* :class:`ExplicitDevices`, a ``TorchFunctionMode`` that fails every tensor factory (``arange``, ``zeros``,
  ``tensor``, ``randn``, ...) called from a frame in ``hf_slim/`` or ``patches/`` without ``device=``. Strict about
  hf_slim's own code, blind to transformers' (which hf_slim does not own), so it runs around every family and every
  call, including those whose transformers code itself creates tensors on the default device (Whisper's and MusicGen's
  ``generate``).
* :func:`meta_default_device`: ``torch.device("meta")`` as the default device while the model and its inputs stay on
  the CPU, so a tensor created on the default device *anywhere* (also inside a transformers or torch helper that
  hf_slim calls without a device) is a meta tensor and fails loudly at its first use with a real one. Used where the
  unpatched model itself runs under it.

:class:`HostSyncs` counts what a GPU run pays for in hidden host round trips (``.item()``, ``.tolist()``,
``bool(tensor)``, ``torch.equal``, ``.cpu()``, host-built tensors copied to the device, ...) per source line of
hf_slim, for the audit of the per-step decode path (``scripts/check_device.py --syncs``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch.overrides import TorchFunctionMode

import hf_slim
from hf_slim import patches

#: source folders whose tensor factories must name a device: hf_slim/ and the patch modules (patches/)
OWN_FOLDERS = tuple(str(Path(module.__file__).resolve().parent) + "/" for module in (hf_slim, patches))
#: frames skipped when looking for the code that called a torch function (torch's own Python wrappers, this file)
_SKIPPED = (str(Path(torch.__file__).resolve().parent) + "/", str(Path(__file__).resolve()))

#: functions that create a tensor on the default device unless told ``device=``. ``*_like`` and ``Tensor.new_*``
#: follow their input's device; ``torch.Generator()`` is no tensor.
FACTORIES = frozenset(
    {
        torch.arange, torch.range, torch.linspace, torch.logspace, torch.zeros, torch.ones, torch.full, torch.empty,
        torch.empty_strided, torch.eye, torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor,
        torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.tril_indices,
        torch.triu_indices, torch.hann_window, torch.hamming_window, torch.blackman_window, torch.bartlett_window,
        torch.kaiser_window, torch.sparse_coo_tensor,
    }
)  # fmt: skip
#: factories that keep the device of a tensor they are given (``as_tensor(t)``): only other data is created anew
_CONVERTERS = frozenset({torch.as_tensor, torch.asarray})


def _caller(skip: int = 2):
    """The first frame outside torch and this file: the code that called the torch function."""
    frame = sys._getframe(skip)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return frame


def _where(frame) -> str:
    path = frame.f_code.co_filename
    for folder in OWN_FOLDERS:
        if path.startswith(folder):
            path = f"{Path(folder).name}/{path[len(folder) :]}"
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


def _own(frame) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(OWN_FOLDERS)


class DefaultDeviceError(AssertionError):
    """hf_slim created a tensor on the default device (no ``device=``): on a GPU it would be on the wrong device."""


class ExplicitDevices(TorchFunctionMode):
    """Fail every tensor factory called from hf_slim's code (``hf_slim/``, ``patches/``) without a ``device=``.

    Each offence raises :class:`DefaultDeviceError` at the call and is also recorded: leaving the ``with`` block
    raises again if any was seen, so code that catches exceptions on the way cannot hide one. ``violations`` lists
    them (``"hf_slim/sites.py:150 (token_calibration_inputs): torch.randint without device="``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            created = not (func in _CONVERTERS and args and isinstance(args[0], torch.Tensor))
            frame = _caller() if created else None
            if _own(frame):
                message = f"{_where(frame)}: torch.{func.__name__} without device="
                self.violations.append(message)
                raise DefaultDeviceError(
                    f"{message}: the tensor lands on the default device, not the model's (on a GPU: 'Expected all "
                    "tensors to be on the same device'); pass device= (the model's or the input's)"
                )
        return func(*args, **kwargs)

    def __exit__(self, exc_type, exc_value, traceback):
        super().__exit__(exc_type, exc_value, traceback)
        if self.violations and exc_type is None:
            raise DefaultDeviceError(
                "tensors created without device= (caught on the way):\n  " + "\n  ".join(self.violations)
            )
        return False


@contextlib.contextmanager
def meta_default_device() -> Iterator[None]:
    """Make meta the default device inside the block (model and inputs stay where they are): any tensor created
    without naming a device is a meta tensor and fails at its first use with real data."""
    with torch.device("meta"):
        yield


@contextlib.contextmanager
def device_guard(meta: bool = True) -> Iterator[ExplicitDevices]:
    """:class:`ExplicitDevices` inside the block, and with ``meta`` also :func:`meta_default_device` (entered first,
    so the guard sees each factory call as written, before the default device is filled in)."""
    with contextlib.ExitStack() as stack:
        if meta:
            stack.enter_context(meta_default_device())
        guard = stack.enter_context(ExplicitDevices())
        yield guard


@dataclasses.dataclass(frozen=True)
class MetaBreak:
    """Phases of some model types that transformers' own code cannot run with meta as the default device.

    ``types``: model types (``"*"``: every type); ``phases``: ``"greedy"``, ``"static"``, ``"beams"`` (generate()
    variants), ``"slimify"`` (the calibration forward) or ``"forward"`` (forward steps with a cache); ``before``: the
    first transformers version that no longer breaks (None: every version so far).
    """

    types: tuple[str, ...]
    phases: tuple[str, ...]
    reason: str
    before: str | None = None


#: What transformers' own code cannot run with meta as the default device. Those phases run under
#: :class:`ExplicitDevices` alone; tests/test_device.py asserts that the unpatched model fails there too (and runs
#: everywhere else), so the table stays exact on every transformers version the tests run on.
META_BROKEN = (
    MetaBreak(("*",), ("beams",), "GenerationMixin._beam_search builds its top-beam mask on the default device"),
    MetaBreak(
        ("whisper",), ("greedy", "static", "beams"), "Whisper's generate calls .item() on a default-device tensor"
    ),
    MetaBreak(
        ("musicgen",), ("greedy", "static"), "build_delay_pattern_mask copies a default-device tensor to the device"
    ),
    MetaBreak(
        ("llama-dynamic",),
        ("greedy", "static", "beams", "slimify"),
        "past the original context (the 64-token calibration batch too) the dynamic NTK update builds its inv_freq on "
        "the default device",
    ),
    MetaBreak(
        ("musicgen", "musicgen_decoder"),
        ("greedy", "static", "slimify", "forward"),
        "MusicgenSinusoidalPositionalEmbedding builds its position ids on the default device",
        before="5.18",
    ),
)


def meta_applies(model_type: str, phase: str) -> bool:
    """Whether ``phase`` of ``model_type`` runs with meta as the default device on the installed transformers (not
    listed in :data:`META_BROKEN`)."""
    installed = Version(transformers.__version__)
    return not any(
        phase in entry.phases
        and ("*" in entry.types or model_type in entry.types)
        and (entry.before is None or installed < Version(entry.before))
        for entry in META_BROKEN
    )


#: Tensor methods and torch functions that wait for the device (a value or a shape depends on the data) or copy to
#: the host; the names :class:`HostSyncs` reports them by
_SYNCS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__index__: "index(tensor)",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
    torch.equal: "torch.equal",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.masked_select: "masked_select",
    torch.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
}


class HostSyncs(TorchFunctionMode):
    """Count host round trips made by hf_slim's own lines (``counts[(where, what)]``).

    Besides :data:`_SYNCS`: ``.to()`` between devices (GPU runs only), boolean-mask indexing (its shape depends on
    the data), ``repeat_interleave`` with tensor repeats, and tensors built from host data (``torch.tensor(list,
    device=...)``: on a GPU a blocking copy from pageable memory; counted here whatever the device). On the CPU none
    of these costs anything, which is why they hide; on a GPU each waits for the queued kernels. Compare the counts
    of two generate() runs of different lengths to find the per-step ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def _what(self, func, args, kwargs) -> str | None:
        what = _SYNCS.get(func)
        if what is not None:
            return what
        if func is torch.Tensor.to:  # only a move between devices (on a CPU run: never; on a GPU run: both ways)
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
            target = other.device if target is None and other is not None else target
            if target is None or torch.device(target).type == args[0].device.type:
                return None
            return "to(cpu)" if torch.device(target).type == "cpu" else "host tensor to the device"
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                return "boolean-mask index"
            return None
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            return "repeat_interleave(tensor repeats)" if isinstance(repeats, torch.Tensor) else None
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and args and not isinstance(args[0], torch.Tensor):
            return f"torch.{func.__name__}(host data)"  # on a GPU: built on the host, copied (blocking) to the device
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = self._what(func, args, kwargs)
        if what is not None:
            frame = _caller()
            if _own(frame):
                self.counts[(_where(frame), what)] += 1
        return func(*args, **kwargs)
