"""The tiny models: deterministic files that llama.cpp really loads, tokenizes and runs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import UnknownModelError
from models.catalog import load_catalog
from models.gguf_info import read_gguf_info
from models.tiny import TINY_MODELS, make_tiny, tiny_vocab

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "Hello world, the quick brown fox.",
    "x = 3 + 4; print(x)\n  indented\ttab {braces} [and] $ymbols ~!",
    "Once upon a time",
    "ZZZ qqq 12345",
]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    make_tiny(path)
    return path


@pytest.fixture(scope="module")
def chat(models_dir: Path) -> Iterator[Any]:
    llama_cpp = pytest.importorskip("llama_cpp")
    started = time.perf_counter()
    llm = llama_cpp.Llama(str(models_dir / "tiny-chat.gguf"), n_ctx=4096, seed=0, verbose=False)
    llm.load_seconds = time.perf_counter() - started
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def embedder(models_dir: Path) -> Iterator[Any]:
    llama_cpp = pytest.importorskip("llama_cpp")
    started = time.perf_counter()
    llm = llama_cpp.Llama(str(models_dir / "tiny-embed.gguf"), embedding=True, verbose=False)
    llm.load_seconds = time.perf_counter() - started
    yield llm
    llm.close()


def test_files_are_byte_identical_across_runs(models_dir: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path)
    assert [p.name for p in again] == ["tiny-chat.gguf", "tiny-embed.gguf"]
    for path in again:
        assert path.read_bytes() == (models_dir / path.name).read_bytes()
        assert path.stat().st_size < 2_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-chat.gguf", "tiny-embed.gguf"]


def test_existing_files_are_kept_unless_forced(models_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "tiny-embed.gguf"
    target.write_bytes(b"placeholder")
    assert make_tiny(tmp_path, ["tiny-embed"]) == [target]
    assert target.read_bytes() == b"placeholder"
    assert make_tiny(tmp_path, ["tiny-embed"], force=True) == [target]
    assert target.read_bytes() == (models_dir / "tiny-embed.gguf").read_bytes()
    assert not (tmp_path / "tiny-chat.gguf").exists()


def test_unknown_tiny_model(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="unknown tiny model 'tiny-huge'; make_tiny knows"):
        make_tiny(tmp_path, ["tiny-chat", "tiny-huge"])
    assert list(tmp_path.iterdir()) == []


def test_importing_tiny_does_not_import_llama_cpp() -> None:
    code = "import sys, models.tiny; assert 'llama_cpp' not in sys.modules, 'imported llama_cpp'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_headers_match_the_catalog(models_dir: Path) -> None:
    catalog = load_catalog()
    for name, spec in TINY_MODELS.items():
        entry = catalog.get(name)
        info = read_gguf_info(catalog.path_for(entry, models_dir))
        assert entry.file == spec.file
        assert info.architecture == "llama"
        assert info.context_length == entry.context_length
        assert info.embedding_length == 64
        assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    chat = read_gguf_info(models_dir / "tiny-chat.gguf")
    embed = read_gguf_info(models_dir / "tiny-embed.gguf")
    assert chat.chat_template is not None
    assert chat.pooling_type is None
    assert embed.chat_template is None
    assert embed.pooling_type == 1  # mean


def test_chat_loads_fast_with_its_template(chat: Any) -> None:
    assert chat.load_seconds < 1.0
    assert chat.chat_format == "chat_template.default"
    assert chat.n_vocab() == len(tiny_vocab()[0])
    assert (chat.token_bos(), chat.token_eos()) == (1, 2)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_round_trip(chat: Any, text: str) -> None:
    tokens = chat.tokenize(text.encode())
    assert tokens[0] == chat.token_bos()
    assert chat.detokenize(tokens).decode() == text


def test_common_words_are_single_tokens(chat: Any) -> None:
    assert len(chat.tokenize(b"the quick brown fox", add_bos=False)) == 4
    assert chat.tokenize(b"<|im_end|>", add_bos=False, special=True) == [4]


def test_greedy_generation_is_deterministic(chat: Any) -> None:
    first = chat("The cat", max_tokens=40, temperature=0)
    second = chat("The cat", max_tokens=40, temperature=0)
    text = first["choices"][0]["text"]
    assert text == second["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 40
    assert first["choices"][0]["finish_reason"] == "length"
    assert text.isascii()
    assert len(text.split()) > 5


def test_seeded_sampling_is_deterministic(chat: Any) -> None:
    runs = [chat("Once", max_tokens=30, temperature=0.9, seed=7) for _ in range(2)]
    assert runs[0]["choices"][0]["text"] == runs[1]["choices"][0]["text"]


def test_chat_completion_uses_the_chatml_template(chat: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    reply = chat.create_chat_completion(messages=messages, max_tokens=12, temperature=0)
    rendered = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    expected = chat.tokenize(rendered.encode(), add_bos=False, special=True)
    assert reply["usage"]["prompt_tokens"] == len(expected)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["message"]["content"].strip()
    assert reply["choices"][0]["finish_reason"] == "length"


def test_generation_runs_for_thousands_of_tokens(chat: Any) -> None:
    import llama_cpp

    tokens = []
    for token in chat.generate(chat.tokenize(b"Hello"), temp=0.0):
        tokens.append(token)
        if len(tokens) == 3000:
            break
    assert len(tokens) == 3000
    assert not any(llama_cpp.llama_vocab_is_eog(chat._model.vocab, t) for t in tokens)
    vocab = set(tiny_vocab()[0])
    words = chat.detokenize(tokens).decode("ascii").split()
    assert all("▁" + w.strip(".,!?") in vocab for w in words if w.strip(".,!?"))


def test_embed_gives_one_vector_per_text(embedder: Any) -> None:
    assert embedder.load_seconds < 1.0
    vectors = embedder.embed(["hello world", "the quick brown fox", "hello world", "x"])
    assert len(vectors) == 4
    assert all(len(v) == 64 for v in vectors)
    # The same text at another place in the batch: equal up to float rounding (llama.cpp's
    # kernels may sum in a different order for another batch position).
    assert max(abs(a - b) for a, b in zip(vectors[0], vectors[2], strict=True)) < 1e-5
    assert vectors[0] != vectors[1]
    assert vectors[1] != vectors[3]
    single = embedder.embed("hello world", normalize=True)  # a str gives one vector
    assert len(single) == 64
    assert abs(sum(x * x for x in single) - 1.0) < 1e-4
