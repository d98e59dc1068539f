"""Counting a prompt's tokens at submit with the model's own tokenizer (vocabulary only)."""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path
from typing import Any

from app.core.config import get_settings
from models.catalog import CatalogEntry

log = logging.getLogger(__name__)

_vocabs: dict[Path, Any] = {}
_lock = threading.Lock()


def _vocab(path: Path) -> Any:
    vocab = _vocabs.get(path)
    if vocab is not None:
        return vocab
    with _lock:
        if path not in _vocabs:
            from llama_cpp import Llama

            _vocabs[path] = Llama(model_path=str(path), vocab_only=True, verbose=False)
        return _vocabs[path]


@atexit.register
def close_vocabularies() -> None:
    """Free the loaded vocabularies. At exit it runs before the interpreter tears down its
    modules: llama.cpp's own finalizer cannot free a model after that (it finds its
    library's functions gone and prints an ignored exception instead)."""
    with _lock:
        loaded = list(_vocabs.values())
        _vocabs.clear()
    for vocab in loaded:
        vocab.close()


def count_tokens(entry: CatalogEntry, text: str) -> int | None:
    """Tokens in ``text`` for ``entry``, or None when its GGUF is not on this host."""
    path = get_settings().models_path / entry.file
    if not path.is_file():
        return None
    try:
        vocab = _vocab(path)
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("cannot load the vocabulary of %s: %s", path, exc)
        return None
    return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))
