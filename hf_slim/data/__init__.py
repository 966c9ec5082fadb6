"""Data shipped with the package (sample audio)."""
