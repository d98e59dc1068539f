"""Corral's model files: the catalog, GGUF inspection, downloads and the tiny test models.

    models.catalog    the catalog of known models (``catalog.yaml``) and its loader
    models.gguf_info  read a GGUF header without llama.cpp; verify size and sha256
    models.pull       resumable, verified downloads into the models directory
    models.tiny       deterministic tiny GGUF models for tests and the demo

Nothing here imports llama.cpp; the submodules are imported explicitly.
"""
