"""The transformers version machinery: tested range at import, generation helpers, contracts of adapted forwards."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_unchanged, snapshot
from tiny_models import tiny_gpt2
from transformers.cache_utils import Cache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from hf_slim import is_slim, slimify
from hf_slim._compat import (
    TESTED_RANGE,
    Contract,
    TransformersContractError,
    UntestedTransformersWarning,
    check_transformers_version,
    generic_expand_inputs,
)
from hf_slim.generation import CONTRACTS as GENERATION_CONTRACTS
from hf_slim.registry import SUPPORTED

pytestmark = pytest.mark.oldest_transformers  # the version machinery matters most on the oldest release


@pytest.mark.parametrize("version", ["5.15.0", "5.17.0", "5.23.0", "5.24.0", "5.24.3", "5.25.0", "5.25.2"])
def test_tested_versions_import_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.14.1", "5.0.0", "4.57.6"])
def test_older_than_minimum_is_a_one_line_import_error(version):
    with pytest.raises(ImportError, match=r"needs transformers>=5\.15\.0.*pip install") as raised:
        check_transformers_version(version)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("version", ["5.26.0", "5.26.0.dev0", "6.0.0"])
def test_newer_than_tested_is_one_warning_naming_the_range(version, monkeypatch):
    monkeypatch.delenv("HF_SLIM_SKIP_VERSION_CHECK", raising=False)
    with pytest.warns(UntestedTransformersWarning, match=r"tested with transformers>=5\.15,<5\.26") as record:
        check_transformers_version(version)
    assert len(record) == 1


def test_skip_variable_silences_the_warning_not_the_error(monkeypatch):
    monkeypatch.setenv("HF_SLIM_SKIP_VERSION_CHECK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version("5.30.0")
    with pytest.raises(ImportError):
        check_transformers_version("5.14.1")


def _import_hf_slim_with(version: str) -> subprocess.CompletedProcess:
    """``import hf_slim`` in a fresh interpreter whose transformers reports ``version``."""
    code = f"import transformers; transformers.__version__ = {version!r}; import hf_slim"
    env = {"PYTHONWARNINGS": "default", "PATH": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_under_newer_transformers_warns_once_and_works():
    result = _import_hf_slim_with("5.26.0")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("UntestedTransformersWarning:") == 1, result.stderr


def test_import_under_older_transformers_ends_in_one_line_error():
    result = _import_hf_slim_with("5.14.1")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: hf_slim needs transformers>=5.15.0 but transformers 5.14.1"), last_line


# --- generation helpers ---


class _StaticExpansion:
    """transformers <= 5.17: ``_expand_inputs_for_generation`` is a staticmethod."""

    @staticmethod
    def _expand_inputs_for_generation(expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        return input_ids.repeat_interleave(expand_size, dim=0), model_kwargs


class _MethodExpansion:
    """transformers >= 5.18: a method taking ``self``."""

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        return input_ids.repeat_interleave(expand_size, dim=0), {**model_kwargs, "self": self}


@pytest.mark.parametrize("owner", [_StaticExpansion, _MethodExpansion], ids=["staticmethod", "method"])
def test_generic_expansion_calls_both_conventions(owner):
    model = owner()
    model._expand_inputs_for_generation = None  # an instance patch must not be what gets called
    input_ids = torch.tensor([[1, 2], [3, 4]])
    expanded, kwargs = generic_expand_inputs(model, expand_size=3, input_ids=input_ids, extra=5)
    assert expanded.tolist() == [[1, 2]] * 3 + [[3, 4]] * 3
    assert kwargs["extra"] == 5
    assert kwargs.get("self", model) is model


def test_generic_expansion_without_the_method_fails_loudly():
    with pytest.raises(TransformersContractError, match="has no _expand_inputs_for_generation"):
        generic_expand_inputs(object(), expand_size=2)


# --- contracts of the adapted forwards ---


def _patch_module_contracts() -> list[tuple[str, Contract]]:
    patches = {architecture.patch_module: architecture.load() for architecture in SUPPORTED.values()}
    contracts = [("generation", contract) for contract in GENERATION_CONTRACTS]
    for name, patch in patches.items():
        assert patch.contracts, f"{name} declares no contracts for the transformers code it adapts"
        contracts += [(name.rsplit(".", 1)[-1], contract) for contract in patch.contracts]
    return contracts


@pytest.mark.parametrize(
    "contract",
    [contract for _, contract in _patch_module_contracts()],
    ids=[f"{name}-{c.owner.__name__}.{c.method}" for name, c in _patch_module_contracts()],
)
def test_every_declared_contract_holds_on_the_installed_transformers(contract):
    assert contract.signature_problems() == []


def _forward_without_encoder_states(
    self, hidden_states, position_embeddings=None, cache: Cache | None = None, **kwargs
):
    raise AssertionError("never called: slimify refuses first")


def test_changed_forward_signature_is_refused_and_model_untouched(monkeypatch):
    """An untested transformers whose GPT2Attention.forward no longer takes the encoder output where hf_slim reads it
    (``encoder_hidden_states``): slimify refuses, nothing patched."""
    model = tiny_gpt2()
    monkeypatch.setattr(GPT2Attention, "forward", _forward_without_encoder_states)
    before = snapshot(model)
    with pytest.raises(TransformersContractError, match=r"GPT2Attention\.forward has no parameter\(s\) encoder_hidden"):
        slimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)


def test_missing_attribute_is_refused_with_its_name():
    model = tiny_gpt2()
    del model.transformer.h[1].attn.split_size
    with pytest.raises(TransformersContractError, match=rf"no attribute\(s\) split_size.*transformers{TESTED_RANGE}"):
        slimify(model)
    assert not is_slim(model)


def _masks_with_other_arguments(config, input_embeds, mask, cache, **kwargs):
    raise AssertionError("never called: slimify refuses first")


def test_changed_generic_mask_function_is_refused_for_falcon(monkeypatch):
    """The slim Falcon's create_masks_for_generate stands in for generate()'s default mask function: an untested
    transformers that calls it with other arguments makes slimify refuse, with the model untouched."""
    import transformers.generation.utils
    from tiny_models import tiny_decoder

    model = tiny_decoder("falcon")
    monkeypatch.setattr(transformers.generation.utils, "create_masks_for_generate", _masks_with_other_arguments)
    before = snapshot(model)
    with pytest.raises(TransformersContractError, match=r"generation\.utils\.create_masks_for_generate takes \(config"):
        slimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)


def test_a_source_checkout_imports_its_patch_modules_without_an_editable_install():
    """README's snippet run from the repository root next to a non-editable install: ``import hf_slim`` finds the
    source folder, which has no ``patches`` subfolder; ``hf_slim.patches`` must still resolve, to ``patches/``."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import hf_slim.patches.gpt2\n"
        "print(hf_slim.__file__)\n"
        "print(hf_slim.patches.gpt2.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    package, patch = result.stdout.split()
    assert Path(package) == root / "hf_slim" / "__init__.py"
    assert Path(patch) == root / "patches" / "gpt2.py"


def test_the_command_line_starts_without_importing_transformers_models():
    """``hf-slim --help`` parses before importing what a command needs: no torch, no transformers modeling code."""
    heavy = ("torch", "transformers.modeling_utils")
    code = f"import sys, hf_slim.app.cli.main\nprint(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_library_imports_none_of_the_application():
    """The library (``hf_slim`` outside ``hf_slim/app/``, and ``patches/``) never imports the application: no import
    of ``hf_slim.app`` in its source, and none in ``sys.modules`` after importing the library's modules."""
    root = Path(__file__).resolve().parents[1]
    library = [p for p in (root / "hf_slim").rglob("*.py") if "app" not in p.relative_to(root / "hf_slim").parts]
    offenders = [
        str(path.relative_to(root))
        for path in [*library, *(root / "patches").glob("*.py")]
        if re.search(r"^\s*(from|import)\s+(hf_slim\.app|\.+app)\b", path.read_text(encoding="utf-8"), re.M)
    ]
    assert offenders == []
    modules = ["hf_slim", *(f"hf_slim.{p.stem}" for p in library if p.parent == root / "hf_slim" and p.stem[0] != "_")]
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n" + (
        "print(sorted(m for m in sys.modules if m.startswith('hf_slim.app')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pyproject_requires_the_tested_transformers_range():
    """pyproject.toml's transformers requirement is the range the version check calls tested: a fresh install can
    only resolve to a tested release."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{TESTED_RANGE}" in dependencies
