"""read_gguf_info on good and broken files, and verify_file."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from app.core.errors import ModelFileError
from models.gguf_info import read_gguf_info, sha256_file, verify_file
from models.tiny import make_tiny

HINT = "corral models pull"


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models"), ["tiny-chat"])[0]


def broken(tmp_path: Path, data: bytes, name: str = "broken.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_error(path: Path) -> str:
    with pytest.raises(ModelFileError) as info:
        read_gguf_info(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def test_reads_the_header(tiny_chat: Path) -> None:
    info = read_gguf_info(tiny_chat)
    assert info.path == tiny_chat
    assert info.size_bytes == tiny_chat.stat().st_size
    assert info.architecture == "llama"
    assert info.name == "Corral tiny-chat"
    assert (info.context_length, info.embedding_length, info.block_count) == (8192, 64, 2)
    assert (info.head_count, info.head_count_kv) == (4, 4)
    assert info.file_type == 0  # all F32
    assert info.n_tensors == 3 + 9 * 2
    assert info.tensor_bytes == info.n_params * 4
    assert info.tensor_bytes < info.size_bytes
    assert (info.bos_token_id, info.eos_token_id, info.pooling_type) == (1, 2, None)
    assert info.chat_template is not None
    assert "<|im_start|>" in info.chat_template


def test_missing_file(tmp_path: Path) -> None:
    message = read_error(tmp_path / "absent.gguf")
    assert "no such file" in message
    assert HINT in message
    assert "corral models make-tiny" in message


def test_not_gguf(tmp_path: Path) -> None:
    message = read_error(broken(tmp_path, b"<!DOCTYPE html><html>Not found</html>"))
    assert "not a GGUF file (it starts with b'<!DO', not b'GGUF')" in message
    assert HINT in message


def test_empty_file(tmp_path: Path) -> None:
    assert "not a GGUF file (it is empty)" in read_error(broken(tmp_path, b""))


def test_directory(tmp_path: Path) -> None:
    assert "not a regular file" in read_error(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 300])
def test_truncated(tiny_chat: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_chat.read_bytes()
    cut = int(len(data) * keep) if keep < 1 else int(keep)
    path = broken(tmp_path, data[:cut])
    message = read_error(path)
    assert "truncated: the header needs" in message
    assert f"the file has only {cut}" in message
    assert HINT in message


def test_truncated_copy_is_detected_but_original_is_fine(tiny_chat: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(tiny_chat, copy)
    assert read_gguf_info(copy).n_params == read_gguf_info(tiny_chat).n_params
    with copy.open("r+b") as fh:
        fh.truncate(copy.stat().st_size - 1)
    assert "truncated" in read_error(copy)


def test_garbage_after_magic(tmp_path: Path) -> None:
    noise = random.Random(7).randbytes(4096)
    message = read_error(broken(tmp_path, b"GGUF" + noise))
    assert "unreadable GGUF metadata" in message
    assert HINT in message


def test_garbage_after_a_valid_version(tmp_path: Path) -> None:
    noise = random.Random(8).randbytes(4096)
    message = read_error(broken(tmp_path, b"GGUF\x03\x00\x00\x00" + noise))
    assert "corrupt GGUF header" in message or "unreadable GGUF metadata" in message
    assert HINT in message


def test_verify_file(tiny_chat: Path) -> None:
    data = tiny_chat.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert sha256_file(tiny_chat) == digest
    assert sha256_file(tiny_chat, chunk_bytes=1000) == digest
    verify_file(tiny_chat, len(data), digest)
    verify_file(tiny_chat, None, None)
    verify_file(tiny_chat, len(data), digest.upper())

    with pytest.raises(
        ModelFileError, match=f"size mismatch: expected {len(data) + 1} bytes, got {len(data)}"
    ):
        verify_file(tiny_chat, len(data) + 1, digest)
    wrong = "0" * 64
    with pytest.raises(ModelFileError, match=f"sha256 mismatch: expected {wrong}, got {digest}"):
        verify_file(tiny_chat, None, wrong)


def test_verify_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        verify_file(tmp_path / "absent.gguf", 1, None)
