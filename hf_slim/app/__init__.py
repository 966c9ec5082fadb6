"""The hf-slim application built on the library: the ``hf-slim`` command line (:mod:`hf_slim.app.cli`) and the bulk
jobs it runs (audio decoding, batched Whisper transcription, output files, memory budgets, Ray). The library
(``hf_slim`` without ``app``) never imports it."""
