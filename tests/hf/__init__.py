"""Hugging Face interop tests (helpers in tests/hf/helpers.py; kept out of here so that spawned gloo ranks,
which import this package, do not pay for importing transformers)."""
