"""Download a catalog model's GGUF: resumable, verified, renamed into place atomically.

A model whose catalog entry names a ``package`` that is installed is placed from that
package's directory (copied, no network); otherwise bytes go to ``<file>.part`` in the
models directory. A later pull resumes it with
``Range: bytes=N-``; a server that ignores the range (200) or finds the part stale makes
the pull start over cleanly. The finished part is checked against the catalog's size and
sha256 (when published) and the server's Content-Length, read as GGUF, and only then
renamed to its final name. httpx exceptions are translated to
:class:`~app.core.errors.DownloadError` here, at the boundary.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import httpx
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from app.core.errors import DownloadError, ModelFileError
from models.catalog import CatalogEntry
from models.gguf_info import read_gguf_info, sha256_file, verify_file

__all__ = ["packaged_file", "part_path", "pull"]

logger = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)$")


def part_path(dest: Path) -> Path:
    """Where the partial download of ``dest`` is kept."""
    return dest.with_name(dest.name + ".part")


def packaged_file(entry: CatalogEntry) -> Path | None:
    """The entry's GGUF inside its installed ``package`` (found without importing it)."""
    if entry.package is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), entry.file)
    return path if path.is_file() else None


def pull(
    entry: CatalogEntry,
    models_dir: Path,
    *,
    progress: bool = True,
    client: httpx.Client | None = None,
    chunk_bytes: int = 1 << 20,
    timeout_s: float = 30.0,
) -> Path:
    """Make sure ``entry``'s GGUF is in ``models_dir``, downloading it if needed; return its path.

    A file that is already there is verified (size, sha256, GGUF header) and returned.
    Otherwise it is copied from the entry's installed ``package`` if there is one, else
    downloaded, resuming ``<file>.part`` if there is one; either way verified before it
    takes its name. Raises
    :class:`~app.core.errors.DownloadError` for HTTP and network errors and for a download that
    does not match the catalog (the bad part is deleted), and
    :class:`~app.core.errors.ModelFileError` for a present file that does not verify.

    Example::

        entry = load_catalog().get("gemma-3-1b")
        path = pull(entry, settings.models_path)
    """
    dest = models_dir / entry.file
    url = entry.source_url
    shipped = packaged_file(entry)
    if shipped is not None and not dest.exists():
        return _place(entry, shipped, dest)
    if url is None:
        raise DownloadError(
            f"model {entry.name!r} has no download URL: it is generated locally; "
            "run `corral models make-tiny`"
        )
    if dest.exists():
        verify_file(dest, entry.size_bytes, entry.sha256)
        read_gguf_info(dest)
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    http = client if client is not None else httpx.Client()
    try:
        served_total = _download(entry, url, part, http, progress, chunk_bytes, timeout_s)
    finally:
        if client is None:
            http.close()
    _verify_download(entry, url, part, served_total)
    os.replace(part, dest)
    logger.info("pulled %s into %s", entry.name, dest)
    return dest


def _place(entry: CatalogEntry, shipped: Path, dest: Path) -> Path:
    """Copy the file a package ships into place, verified like a download."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    shutil.copyfile(shipped, part)
    _verify_download(entry, str(shipped), part, None)
    os.replace(part, dest)
    logger.info("placed %s from the %s package into %s", entry.name, entry.package, dest)
    return dest


def _download(
    entry: CatalogEntry,
    url: str,
    part: Path,
    http: httpx.Client,
    progress: bool,
    chunk_bytes: int,
    timeout_s: float,
) -> int | None:
    """Fetch ``url`` into ``part``, resuming it; return the total size the server announced."""
    for _attempt in range(2):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            logger.info("resuming %s at byte %d", url, offset)
        try:
            with http.stream(
                "GET", url, headers=headers, timeout=timeout_s, follow_redirects=True
            ) as resp:
                start, total = _parse_content_range(resp.headers.get("content-range"))
                if resp.status_code == 416 and offset:
                    if offset in (total, entry.size_bytes):
                        return offset  # the part was already complete
                    logger.warning("%s: partial file is stale (416); starting over", part)
                    part.unlink()
                    continue
                if resp.status_code == 206:
                    if start != offset:
                        logger.warning("%s: server sent range %s; starting over", url, start)
                        part.unlink()
                        continue
                elif resp.status_code == 200:
                    if offset:
                        logger.warning("%s ignored the Range header; starting over", url)
                    offset = 0
                else:
                    raise DownloadError(
                        f"GET {url} failed: HTTP {resp.status_code} {resp.reason_phrase}; "
                        f"check source_url of catalog entry {entry.name!r}"
                    )
                length = resp.headers.get("content-length")
                if length is not None and length.isdigit():
                    total = offset + int(length)
                elif resp.status_code == 200:
                    total = None
                if total is not None and entry.size_bytes is not None and total != entry.size_bytes:
                    part.unlink(missing_ok=True)
                    raise DownloadError(
                        f"{url}: size mismatch: the catalog expects {entry.size_bytes} bytes, "
                        f"the server offers {total}; check the catalog entry {entry.name!r}"
                    )
                _write_body(resp, part, offset, total, entry.name, progress, chunk_bytes)
                return total
        except httpx.HTTPError as exc:
            have = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"download of {url} failed after {have} bytes ({type(exc).__name__}: {exc}); "
                f"run `corral models pull {entry.name}` again to resume"
            ) from exc
    raise DownloadError(
        f"{url}: the server keeps answering with ranges that do not match {part}; "
        "delete it and pull again"
    )


def _write_body(
    resp: httpx.Response,
    part: Path,
    offset: int,
    total: int | None,
    label: str,
    progress: bool,
    chunk_bytes: int,
) -> None:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with (
        Progress(*columns, disable=not progress) as bar,
        part.open("ab" if offset else "wb", buffering=chunk_bytes) as fh,
    ):
        task = bar.add_task(label, total=total, completed=offset)
        for chunk in resp.iter_raw():
            fh.write(chunk)
            bar.advance(task, len(chunk))


def _verify_download(entry: CatalogEntry, url: str, part: Path, served_total: int | None) -> None:
    actual = part.stat().st_size
    problem = None
    if served_total is not None and actual != served_total:
        problem = f"size mismatch: the server announced {served_total} bytes, got {actual}"
    elif entry.size_bytes is not None and actual != entry.size_bytes:
        problem = f"size mismatch: expected {entry.size_bytes} bytes, got {actual}"
    elif entry.sha256 is not None and (digest := sha256_file(part)) != entry.sha256:
        problem = f"sha256 mismatch: expected {entry.sha256}, got {digest}"
    if problem is None:
        try:
            read_gguf_info(part)
        except ModelFileError as exc:
            problem = f"the download is not a usable GGUF file ({exc})"
    if problem is not None:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: {problem}; the download was deleted: check the catalog entry "
            f"{entry.name!r}, then run `corral models pull {entry.name}` again"
        )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes 100-199/1000`` or ``bytes */1000``."""
    match = _CONTENT_RANGE.match(value.strip()) if value else None
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total.isdigit() else None)
