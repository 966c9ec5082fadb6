"""Patches, one module per architecture (installed as ``hf_slim.patches``)."""
