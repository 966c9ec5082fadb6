"""The ``hf-slim`` command line: one module per command (transcribe, generate, export, verify, memory), what they
share (:mod:`~hf_slim.app.cli.common`) and the entry point (:func:`hf_slim.app.cli.main.main`)."""
