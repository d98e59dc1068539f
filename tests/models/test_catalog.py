"""The shipped catalog and the catalog loader's validation and errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.errors import ConfigError, UnknownModelError
from models.catalog import CATALOG_PATH, Catalog, CatalogEntry, load_catalog

REAL = {
    "qwen2.5-7b": ("chat", 32768),
    "qwen2.5-coder-7b": ("chat", 32768),
    "gemma-3-1b": ("chat", 32768),
    "nomic-embed-text": ("embed", 2048),
    "smollm2-135m": ("chat", 8192),
}

ENTRY = """\
models:
  - name: small
    kind: chat
    file: small.gguf
    context_length: 4096
"""


def write(tmp_path: Path, text: str, name: str = "catalog.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_catalog_has_the_real_and_tiny_models() -> None:
    catalog = load_catalog()
    assert catalog.path == CATALOG_PATH
    assert catalog.names() == [*REAL, "tiny-chat", "tiny-embed"]
    for name, (kind, context_length) in REAL.items():
        entry = catalog.get(name)
        assert entry.kind == kind
        assert entry.context_length == context_length
        assert entry.n_ctx == min(context_length, 8192)
        assert entry.source_url is not None
        assert re.fullmatch(
            r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/(main|[0-9a-f]{40})/[\w.-]+",
            entry.source_url,
        )
        assert entry.source_url.endswith("/" + entry.file)
        assert entry.file.endswith(".gguf")
        assert not entry.tiny
        if entry.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        if entry.size_bytes is None:
            assert "about" in entry.description, "unknown sizes need a human hint"


def test_shipped_tiny_entries() -> None:
    catalog = load_catalog()
    chat, embed = catalog.get("tiny-chat"), catalog.get("tiny-embed")
    assert (chat.kind, chat.file, chat.context_length, chat.n_ctx) == (
        "chat",
        "tiny-chat.gguf",
        8192,
        8192,
    )
    assert (embed.kind, embed.file, embed.context_length, embed.n_ctx) == (
        "embed",
        "tiny-embed.gguf",
        512,
        512,
    )
    for entry in (chat, embed):
        assert entry.tiny
        assert entry.source_url is None
    assert chat.steps == ("generate", "chat")
    assert embed.steps == ("embed",)


def test_unknown_model_lists_the_catalog() -> None:
    catalog = load_catalog()
    with pytest.raises(UnknownModelError) as info:
        catalog.get("llama-9000")
    assert str(info.value) == (
        "unknown model 'llama-9000'; the catalog has: qwen2.5-7b, qwen2.5-coder-7b, "
        "gemma-3-1b, nomic-embed-text, smollm2-135m, tiny-chat, tiny-embed"
    )
    assert "llama-9000" not in catalog
    assert "tiny-chat" in catalog


def test_path_for_and_present(tmp_path: Path) -> None:
    catalog = load_catalog()
    assert catalog.present(tmp_path) == []
    assert catalog.path_for("tiny-embed", tmp_path) == tmp_path / "tiny-embed.gguf"
    entry = catalog.get("gemma-3-1b")
    catalog.path_for(entry, tmp_path).write_bytes(b"x")
    (tmp_path / "tiny-chat.gguf").write_bytes(b"x")
    assert [e.name for e in catalog.present(tmp_path)] == ["gemma-3-1b", "tiny-chat"]


def test_load_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = write(tmp_path, ENTRY)
    first = load_catalog(path)
    assert load_catalog(path) is first
    path.write_text(ENTRY.replace("small", "smaller"), encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = load_catalog(path)
    assert second is not first
    assert second.names() == ["smaller"]
    assert second.get("smaller").n_ctx == 4096


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": not valid YAML"):
        load_catalog(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the model catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_wrong_top_level_shape(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top-level 'models:' list"):
        load_catalog(write(tmp_path, "- name: x\n"))


def test_n_ctx_above_context_length_names_entry_and_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, ENTRY + "    n_ctx: 65536\n")
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    message = str(info.value)
    assert message.startswith(f"{path}: model entry #1 ('small'): ")
    assert "n_ctx must be ≤ the model's context_length 4096, got 65536" in message


def test_invalid_field_names_entry_and_field(tmp_path: Path) -> None:
    text = ENTRY + "  - name: broken\n    kind: rerank\n    file: b.gguf\n    context_length: 10\n"
    with pytest.raises(ConfigError, match=r"model entry #2 \('broken'\): kind: "):
        load_catalog(write(tmp_path, text))


def test_missing_field_is_named(tmp_path: Path) -> None:
    text = "models:\n  - name: nofile\n    kind: embed\n    context_length: 512\n"
    with pytest.raises(ConfigError, match=r"entry #1 \('nofile'\): file: Field required"):
        load_catalog(write(tmp_path, text))


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'small' is listed twice"):
        load_catalog(write(tmp_path, ENTRY + ENTRY.removeprefix("models:\n")))


def test_entry_defaults() -> None:
    entry = CatalogEntry(name="big", kind="chat", file="big.gguf", context_length=131072)
    assert entry.n_ctx == 8192
    assert (entry.tiny, entry.split_allowed, entry.parallel) == (False, False, 1)
    assert (entry.source_url, entry.size_bytes, entry.sha256, entry.chat_format) == (None,) * 4
    small = CatalogEntry(name="small", kind="embed", file="s.gguf", context_length=512)
    assert small.n_ctx == 512


def test_sha256_is_validated_and_lowercased() -> None:
    digest = "AB" * 32
    entry = CatalogEntry(name="m", kind="chat", file="m.gguf", context_length=8, sha256=digest)
    assert entry.sha256 == digest.lower()
    with pytest.raises(ValidationError, match="sha256 must be 64 hex digits, got 63 characters"):
        CatalogEntry(name="m", kind="chat", file="m.gguf", context_length=8, sha256="a" * 63)
    with pytest.raises(ValidationError, match="64 hex digits"):
        CatalogEntry(name="m", kind="chat", file="m.gguf", context_length=8, sha256="g" * 64)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "Has Space", "model names are lowercase"),
        ("file", "../escape.gguf", "plain file name"),
        ("source_url", "ftp://example.com/m.gguf", "http(s) URL"),
        ("parallel", 0, "greater than or equal to 1"),
        ("size_bytes", 0, "greater than 0"),
    ],
)
def test_field_checks(field: str, value: object, message: str) -> None:
    data: dict[str, object] = {"name": "m", "kind": "chat", "file": "m.gguf", "context_length": 8}
    with pytest.raises(ValidationError, match=re.escape(message)):
        CatalogEntry.model_validate({**data, field: value})


def test_catalog_keeps_order_and_is_iterable() -> None:
    entries = tuple(
        CatalogEntry(name=n, kind="embed", file=f"{n}.gguf", context_length=8) for n in "cab"
    )
    catalog = Catalog(entries)
    assert [e.name for e in catalog] == ["c", "a", "b"]
    assert len(catalog) == 3
    assert catalog.entries == entries


def test_cache_follows_a_symlink_that_is_repointed(tmp_path: Path) -> None:
    # Deployments swap a catalog by repointing a symlink: the next load reads the new file.
    first_file = write(tmp_path, ENTRY)
    second_dir = tmp_path / "v2"
    second_dir.mkdir()
    second_file = write(second_dir, ENTRY.replace("small", "other"))
    os.utime(second_file, ns=(first_file.stat().st_atime_ns, first_file.stat().st_mtime_ns))
    link = tmp_path / "current.yaml"
    link.symlink_to(first_file)
    assert load_catalog(link).names() == ["small"]
    link.unlink()
    link.symlink_to(second_file)
    catalog = load_catalog(link)
    assert catalog.names() == ["other"]
    assert catalog.path == second_file.resolve()
