"""The "next release" drill: hf_slim's version machinery against a transformers whose model file changed the way 5.24
and 5.25 changed theirs.

Each case writes the installed model file with one edit (a renamed argument, a removed helper, attention computed
inline again, a renamed cache parameter) to a temporary folder, imports it next to the original, and installs its
classes' methods and module functions on the installed ones, as upgrading transformers would. slimify must then either
serve the model exactly as the unpatched one runs (what hf_slim reads by role: the cache argument) or refuse with a
clean :class:`TransformersContractError` before changing anything; never compute something else.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import assert_same_tokens, assert_unchanged, snapshot
from tiny_models import tiny_decoder
from transformers.models.bloom import modeling_bloom
from transformers.models.falcon import modeling_falcon
from transformers.models.opt import modeling_opt

from hf_slim import is_slim, slimify
from hf_slim._compat import TransformersContractError

pytestmark = pytest.mark.oldest_transformers  # the version machinery matters most on the oldest release

#: (class whose source the edit applies to, or None for the whole file; pattern; replacement)
Edit = tuple[str | None, str, str]


def _edited(source: str, edits: list[Edit]) -> str:
    """``source`` with every edit applied (each must match), a class's edits only inside that class."""
    for owner, pattern, replacement in edits:
        start, end = 0, len(source)
        if owner is not None:
            start = source.index(f"\nclass {owner}(")
            following = source.find("\nclass ", start + 1)
            end = len(source) if following < 0 else following
        part, count = re.subn(pattern, replacement, source[start:end], flags=re.S)
        assert count, f"drill setup: {pattern!r} matches nothing in {owner or 'the file'} of this transformers"
        source = source[:start] + part + source[end:]
    return source


def _next_release(monkeypatch, tmp_path: Path, module: ModuleType, edits: list[Edit], classes: tuple[str, ...]):
    """Install the edited model file: the methods of ``classes`` replace the installed ones, module functions the
    edit removed are removed (monkeypatch undoes it all after the test)."""
    path = tmp_path / Path(module.__file__).name
    path.write_text(_edited(Path(module.__file__).read_text(), edits))
    name = f"{module.__package__}._next_release_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    edited = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, edited)
    spec.loader.exec_module(edited)
    for class_name in classes:
        installed, new = getattr(module, class_name), getattr(edited, class_name)
        for attribute, value in vars(new).items():
            if inspect.isfunction(value) and not attribute.startswith("__"):  # instances stay the installed classes'
                monkeypatch.setattr(installed, attribute, value)
    for attribute, value in list(vars(module).items()):
        if inspect.isfunction(value) and value.__module__ == module.__name__ and not hasattr(edited, attribute):
            monkeypatch.delattr(module, attribute)


def _assert_refused(model: torch.nn.Module, match: str) -> None:
    before = snapshot(model)
    with pytest.raises(TransformersContractError, match=match):
        slimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)


#: OPTAttention.forward's cache parameter (past_key_values up to 5.23, cache from 5.24) renamed, as 5.24 renamed it
RENAMED_CACHE = [
    ("OPTAttention", r"(\n    @deprecate_kwarg\([^\n]*\))?(?=\n    def forward)", ""),  # its old-name shim, from 5.24
    ("OPTAttention", r"\b(past_key_values|cache)\b", "layer_cache"),
    ("OPTDecoderLayer", r"\b(past_key_values|cache)=(past_key_values|cache),", r"layer_cache=\2,"),
]
#: BloomAttention's alibi renamed, as 5.25 changed Falcon's (BLOOM still computes attention itself)
RENAMED_ARGUMENT = [("BloomAttention", r"\balibi\b", "position_bias")]
#: the model file's eager attention function removed, as 5.25 removed Falcon's _split_heads and _merge_heads
REMOVED_HELPER = [(None, r"\ndef eager_attention_forward\(.*?\n(?=\n\nclass |\n\ndef |\n\n@)", "\n")]
#: OPTAttention computing attention with its own function instead of the attention interface (what GPT-J did up to
#: 5.23 and Falcon up to 5.24): hf_slim's registered function would never be called
INLINE_ATTENTION = [
    ("OPTAttention", r"ALL_ATTENTION_FUNCTIONS\.get_interface\(\s*self\.config\._attn_implementation,\s*"
     r"eager_attention_forward\s*\)", "eager_attention_forward"),
]  # fmt: skip


def test_a_renamed_cache_parameter_is_served_as_before(monkeypatch, tmp_path):
    """hf_slim reads the cache by type and annotation, never by name: a release that renames it (as 5.24 did) is
    served, with the unpatched model's tokens."""
    _next_release(monkeypatch, tmp_path, modeling_opt, RENAMED_CACHE, ("OPTAttention", "OPTDecoderLayer"))
    assert "layer_cache" in inspect.signature(modeling_opt.OPTAttention.forward).parameters
    vanilla = tiny_decoder("opt", attn="eager")
    slim = slimify(tiny_decoder("opt", attn="eager"))
    ids = torch.randint(3, vanilla.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=8, do_sample=False)
    assert_same_tokens(slim.generate(ids, **settings), vanilla.generate(ids, **settings), "renamed cache parameter")


def test_a_renamed_argument_of_an_adapted_forward_is_refused(monkeypatch, tmp_path):
    _next_release(monkeypatch, tmp_path, modeling_bloom, RENAMED_ARGUMENT, ("BloomAttention",))
    _assert_refused(tiny_decoder("bloom"), r"BloomAttention\.forward takes \(.*position_bias.*expects it to start with")


def test_a_removed_helper_of_a_routed_family_is_refused(monkeypatch, tmp_path):
    _next_release(monkeypatch, tmp_path, modeling_opt, REMOVED_HELPER, ("OPTAttention",))
    assert not hasattr(modeling_opt, "eager_attention_forward")
    _assert_refused(tiny_decoder("opt"), r"modeling_opt\.eager_attention_forward does not exist")


def test_attention_computed_inline_again_is_refused(monkeypatch, tmp_path):
    _next_release(monkeypatch, tmp_path, modeling_opt, INLINE_ATTENTION, ("OPTAttention",))
    _assert_refused(tiny_decoder("opt"), r"OPTAttention\.forward does not use ALL_ATTENTION_FUNCTIONS")


def test_falcon_changed_again_is_refused(monkeypatch, tmp_path):
    """Falcon's attention changed the other way once more: up to 5.24 (adapted forward) a forward without ``alibi``,
    as 5.25 made it; from 5.25 (routed, ALiBi in the mask) a forward that takes ``alibi`` again, which the route would
    leave out of the slim decode."""
    from hf_slim.patches import falcon

    if falcon.ROUTED:
        edit = (
            "FalconAttention",
            r"(\n        hidden_states: torch\.Tensor,)",
            r"\1\n        alibi: torch.Tensor | None,",
        )
        match = r"FalconAttention\.forward takes alibi"
    else:
        edit = ("FalconAttention", r"\n        alibi: torch\.Tensor \| None,", "")
        match = r"FalconAttention\.forward takes \(hidden_states, attention_mask"
    _next_release(monkeypatch, tmp_path, modeling_falcon, [edit], ("FalconAttention",))
    _assert_refused(tiny_decoder("falcon"), match)
