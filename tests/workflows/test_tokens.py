"""Counting a prompt's tokens at submit with the model's vocabulary, loaded once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from app.core.config import Settings, use_settings
from app.workflows import tokens
from models.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[2]


def test_a_vocabulary_is_loaded_once_and_counts_like_the_model(models_dir: Path) -> None:
    import llama_cpp

    entry = load_catalog().get("tiny-chat")
    text = "Hello there, how many tokens is this?"
    tokens.close_vocabularies()
    with use_settings(Settings(models_dir=models_dir)):
        counted = tokens.count_tokens(entry, text)
        [loaded] = tokens._vocabs.values()
        assert tokens.count_tokens(entry, text) == counted
        assert list(tokens._vocabs.values()) == [loaded]  # the same one, not a second load
    model = llama_cpp.Llama(str(models_dir / entry.file), vocab_only=True, verbose=False)
    try:
        assert counted == len(model.tokenize(text.encode(), add_bos=False, special=False))
    finally:
        model.close()
    tokens.close_vocabularies()
    assert tokens._vocabs == {}


def test_a_vocabulary_still_loaded_at_exit_is_freed_by_atexit(models_dir: Path) -> None:
    """llama.cpp's own finalizer cannot free a model once the interpreter has torn down
    its modules (it prints an ignored TypeError), so the vocabularies are closed at exit,
    before that. An exit handler registered before app.workflows.tokens runs after its own (they
    run last in, first out) and sees the model freed."""
    script = textwrap.dedent(
        """
        import atexit

        seen = {}
        atexit.register(lambda: print("freed" if seen["vocab"]._model.model is None else "alive"))
        from app.workflows import tokens
        from models.catalog import load_catalog
        print(tokens.count_tokens(load_catalog().get("tiny-chat"), "hello world"))
        [seen["vocab"]] = tokens._vocabs.values()
        """
    )
    env = {**os.environ, "CORRAL_MODELS_DIR": str(models_dir)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    counted, freed = done.stdout.split()
    assert int(counted) > 0
    assert freed == "freed"
