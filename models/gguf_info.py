"""Read what a GGUF file says about itself, without loading it into llama.cpp.

:func:`read_gguf_info` memory-maps the file with the ``gguf`` package's ``GGUFReader`` and
returns a :class:`GgufInfo`; every way a file can be unusable (missing, not GGUF, cut
short, garbled metadata) becomes a :class:`~app.core.errors.ModelFileError` that names the file,
the problem and what to do. :func:`verify_file` checks a file against a published size
and sha256.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader

from app.core.errors import ModelFileError

__all__ = ["GgufInfo", "gguf_field", "open_gguf", "read_gguf_info", "sha256_file", "verify_file"]

GGUF_MAGIC = b"GGUF"
HASH_CHUNK_BYTES = 1 << 20
FIX_HINT = (
    "run `corral models pull <model>` to download it "
    "(or `corral models make-tiny` for the tiny test models)"
)
# No real GGUF comes near this; a header that asks for more is garbage, not a short file.
IMPLAUSIBLE_BYTES = 1 << 48


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says: architecture, sizes, tokenizer ids, chat template."""

    path: Path
    size_bytes: int
    architecture: str
    name: str | None
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    file_type: int | None
    n_tensors: int
    n_params: int
    tensor_bytes: int
    chat_template: str | None
    pooling_type: int | None
    bos_token_id: int | None
    eos_token_id: int | None


class _PastEndOfFile(Exception):
    def __init__(self, end: int, size: int) -> None:
        super().__init__(f"needs bytes up to {end}")
        self.end = end
        self.size = size


class _BoundedReader(GGUFReader):
    """A GGUFReader that says "past the end of the file" instead of failing obscurely."""

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Literal["I", "S", "<"] | None = None,
    ) -> npt.NDArray[Any]:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.nbytes:
            raise _PastEndOfFile(end, int(self.data.nbytes))
        return super()._get(offset, dtype, count, override_order)


def open_gguf(path: Path) -> GGUFReader:
    """Memory-map a GGUF file and check it, raising ModelFileError with what to do.

    The reader of an unchanged file (same path, size and modification time) is reused:
    parsing the metadata walks the whole vocabulary (seconds for a 49k-token one), and a
    worker's start and the host agent's estimates would otherwise do it again each time.
    """
    size = _check_file(path)
    try:
        stat = path.stat()
    except OSError:
        return _open_gguf(path, size)
    return _cached_reader(path.resolve(), size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_reader(path: Path, size: int, _mtime_ns: int) -> GGUFReader:
    return _open_gguf(path, size)


def _open_gguf(path: Path, size: int) -> GGUFReader:
    try:
        reader = _BoundedReader(path)
    except _PastEndOfFile as exc:
        raise _truncated(path, exc.end, exc.size) from exc
    except Exception as exc:
        raise ModelFileError(
            f"{path}: unreadable GGUF metadata ({type(exc).__name__}: {exc}); "
            f"the file is corrupt: delete it and {FIX_HINT}"
        ) from exc
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise _truncated(path, end, size)
    return reader


def gguf_field(reader: GGUFReader, key: str) -> Any:
    """One decoded metadata value, or None (decodes only that field)."""
    raw = reader.fields.get(key)
    return None if raw is None else _value(raw)


def read_gguf_info(path: Path) -> GgufInfo:
    """Read the header of the GGUF file at ``path``.

    Raises :class:`~app.core.errors.ModelFileError` when the file is missing, is not GGUF, is
    truncated (tensor data past the end of the file) or has unreadable metadata.

    Example::

        info = read_gguf_info(Path(".corral/models/tiny-chat.gguf"))
        info.architecture, info.context_length   # ('llama', 8192)
    """
    reader = open_gguf(path)
    size = int(reader.data.nbytes)

    def field(key: str) -> Any:  # decode only what we report: vocabularies can be huge
        return gguf_field(reader, key)

    arch = field("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(
            f"{path}: the GGUF metadata has no general.architecture; "
            f"this is not a model llama.cpp can load: delete it and {FIX_HINT}"
        )
    return GgufInfo(
        path=path,
        size_bytes=size,
        architecture=arch,
        name=_str(field("general.name")),
        context_length=_int(field(f"{arch}.context_length")),
        embedding_length=_int(field(f"{arch}.embedding_length")),
        block_count=_int(field(f"{arch}.block_count")),
        head_count=_int(field(f"{arch}.attention.head_count")),
        head_count_kv=_int(field(f"{arch}.attention.head_count_kv")),
        file_type=_int(field("general.file_type")),
        n_tensors=len(reader.tensors),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        chat_template=_str(field("tokenizer.chat_template")),
        pooling_type=_int(field(f"{arch}.pooling_type")),
        bos_token_id=_int(field("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int(field("tokenizer.ggml.eos_token_id")),
    )


def sha256_file(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """The lowercase hex sha256 of a file, read in ``chunk_bytes`` pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, size_bytes: int | None, sha256: str | None) -> None:
    """Check ``path`` against a published size and sha256 (either may be ``None``: unknown).

    Raises :class:`~app.core.errors.ModelFileError` naming the expected and actual values.
    """
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file; {FIX_HINT}")
    actual_size = path.stat().st_size
    if size_bytes is not None and actual_size != size_bytes:
        raise ModelFileError(
            f"{path}: size mismatch: expected {size_bytes} bytes, got {actual_size}; "
            f"delete it and {FIX_HINT}"
        )
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ModelFileError(
                f"{path}: sha256 mismatch: expected {sha256.lower()}, got {actual}; "
                f"delete it and {FIX_HINT}"
            )


def _check_file(path: Path) -> int:
    if not path.exists():
        raise ModelFileError(f"{path}: no such file; {FIX_HINT}")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file; point at the .gguf file itself")
    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        found = "it is empty" if size == 0 else f"it starts with {magic!r}, not {GGUF_MAGIC!r}"
        raise ModelFileError(f"{path}: not a GGUF file ({found}); delete it and {FIX_HINT}")
    return size


def _truncated(path: Path, end: int, size: int) -> ModelFileError:
    if end > IMPLAUSIBLE_BYTES:
        return ModelFileError(
            f"{path}: corrupt GGUF header (it describes {end} bytes of data, the file has "
            f"{size}); delete it and {FIX_HINT}"
        )
    return ModelFileError(
        f"{path}: truncated: the header needs {end} bytes but the file has only {size} "
        f"(an interrupted download?); delete it and {FIX_HINT}"
    )


def _value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # a value gguf cannot decode (bad UTF-8, odd type) is just unknown
        return None


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # per-layer values (e.g. head counts): report the largest
        value = max((v for v in value if isinstance(v, int)), default=None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
