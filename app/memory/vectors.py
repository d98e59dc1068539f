"""Message vectors in Redis and cosine search over a user's history: the ``VectorIndex`` seam.

Two implementations give the same results (both are exact, top-k by cosine, ties broken
by conversation id then seq):

- :class:`RediSearchIndex` when the server has the query engine with vector fields
  (RediSearch ≥ 2.4, Redis Stack, Redis 8): one hash per vector and a ``FLAT`` (exact)
  ``COSINE`` index per tenant and dimension; search is ``FT.SEARCH … KNN``.
- :class:`ScanIndex` otherwise: each conversation's vectors are one append-only string of
  fixed-size records (int64 seq, float32[dim]); a search reads the user's strings — only
  the bytes appended since it last read them, through a per-process cache — and ranks
  them with one NumPy matrix product.

:func:`detect_index` picks one from ``MODULE LIST`` / ``FT._LIST`` (``CORRAL_MEMORY_VECTOR_INDEX``
forces one). Vectors are stored L2-normalised, so cosine is a dot product. Both share the
conversation's ``vecbits`` bitmap, so a message is stored (and counted) once however often
its embedding is delivered.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import numpy.typing as npt
import redis
from redis.exceptions import ResponseError

from app.core.errors import ConfigError
from app.memory.keys import Keys

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
MIN_SEARCH_VERSION = 20400  # RediSearch 2.4 added vector fields


class VectorHit(NamedTuple):
    """One nearest message: where it is and its cosine similarity to the query."""

    conversation_id: str
    seq: int
    score: float


class VectorIndex(Protocol):
    """Stores message vectors and finds a user's nearest messages by cosine."""

    kind: str

    def add(
        self, tenant: str, conversation_id: str, user_id: str, seqs: Sequence[int], vectors: Vectors
    ) -> int:
        """Store vectors for these messages; returns how many were new."""
        ...

    def search(
        self,
        tenant: str,
        user_id: str,
        query: Vectors,
        k: int,
        *,
        conversation_ids: Sequence[str] | None = None,
        exclude: Collection[tuple[str, int]] = (),
    ) -> list[VectorHit]:
        """The ``k`` messages of the user most similar to ``query``, best first."""
        ...

    def drop(self, tenant: str, conversation_id: str) -> None:
        """Forget every vector of a conversation."""
        ...


def normalise(vectors: npt.ArrayLike) -> Vectors:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    arr = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return cast(Vectors, (arr / norms).astype(np.float32))


def top_k(
    cids: Sequence[str],
    owner: npt.NDArray[np.intp],
    seqs: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    k: int,
) -> list[VectorHit]:
    """The best ``k`` rows (score desc, then conversation id, then seq), exactly; row ``i``
    is message ``seqs[i]`` of conversation ``cids[owner[i]]``."""
    if len(scores) == 0 or k <= 0:
        return []
    if len(scores) > k:
        # Everything scoring at least the k-th best (ties included), then an exact sort.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = np.nonzero(scores >= kth)[0]
    else:
        keep = np.arange(len(scores))
    rows = sorted(
        keep.tolist(), key=lambda i: (-float(scores[i]), cids[int(owner[i])], int(seqs[i]))
    )
    return [VectorHit(cids[int(owner[i])], int(seqs[i]), float(scores[i])) for i in rows[:k]]


# KEYS: meta, vecbits, vec. ARGV: dim, n, then (seq, record) pairs.
_SCAN_ADD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local dim = redis.call('HGET', KEYS[1], 'vec_dim')
if dim and dim ~= ARGV[1] then return -2 end
if not dim then redis.call('HSET', KEYS[1], 'vec_dim', ARGV[1]) end
local added = 0
for i = 1, tonumber(ARGV[2]) do
  if redis.call('SETBIT', KEYS[2], tonumber(ARGV[1 + 2 * i]), 1) == 0 then
    redis.call('APPEND', KEYS[3], ARGV[2 + 2 * i])
    added = added + 1
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[1], 'embedded', added) end
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return added
"""


def _record_dtype(dim: int) -> np.dtype[np.void]:
    return np.dtype([("seq", "<i8"), ("vec", "<f4", (dim,))])


@dataclass
class _Decoded:
    """A conversation's vectors as read so far: bytes consumed, seqs, unit vectors."""

    nbytes: int
    seqs: npt.NDArray[np.int64]
    vecs: Vectors

    @property
    def size(self) -> int:
        return int(self.seqs.nbytes + self.vecs.nbytes)


class _VectorCache:
    """What this process already read of each conversation's vectors (LRU by bytes). The
    strings are append-only, so a cached prefix stays valid; only the tail is read."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, _Decoded] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> _Decoded | None:
        with self.lock:
            entry = self.items.get(key)
            if entry is not None:
                self.items.move_to_end(key)
            return entry

    def put(self, key: str, entry: _Decoded) -> None:
        with self.lock:
            self.pop_locked(key)
            if entry.size > self.max_bytes:
                return
            self.items[key] = entry
            self.size += entry.size
            while self.size > self.max_bytes and self.items:
                _, dropped = self.items.popitem(last=False)
                self.size -= dropped.size

    def pop(self, key: str) -> None:
        with self.lock:
            self.pop_locked(key)

    def pop_locked(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.size -= old.size


class ScanIndex:
    """Exact cosine by scanning the user's vectors with NumPy (works on any Redis)."""

    kind: str = "scan"

    def __init__(self, client: redis.Redis, cache_bytes: int = 256 << 20) -> None:
        self.redis = client
        self._add = client.register_script(_SCAN_ADD)
        self.cache = _VectorCache(cache_bytes)

    def add(
        self, tenant: str, conversation_id: str, user_id: str, seqs: Sequence[int], vectors: Vectors
    ) -> int:
        if not len(seqs):
            return 0
        unit = normalise(vectors)
        dim = unit.shape[1]
        records = np.zeros(len(seqs), dtype=_record_dtype(dim))
        records["seq"] = np.asarray(seqs, dtype=np.int64)
        records["vec"] = unit
        args: list[int | bytes] = [dim, len(seqs)]
        for seq, record in zip(seqs, records, strict=True):
            args += [int(seq), record.tobytes()]
        k = Keys(tenant)
        cid = conversation_id
        added = int(self._add(keys=[k.conv(cid), k.vecbits(cid), k.vec(cid)], args=args))
        if added == -2:
            log.warning(
                "conversation %s holds vectors of another dimension than %d; not stored", cid, dim
            )
            return 0
        return max(added, 0)

    def _load(self, tenant: str, cids: Sequence[str], dim: int) -> list[tuple[str, _Decoded]]:
        k = Keys(tenant)
        pipe = self.redis.pipeline(transaction=False)
        for cid in cids:
            pipe.strlen(k.vec(cid))
            pipe.hget(k.conv(cid), "vec_dim")
        sizes = pipe.execute()
        have: list[tuple[str, _Decoded | None, int]] = []
        for i, cid in enumerate(cids):
            size, vdim = int(sizes[2 * i]), sizes[2 * i + 1]
            if size and vdim is not None and int(vdim) == dim:
                entry = self.cache.get(k.vec(cid))
                if entry is not None and (entry.nbytes > size or entry.vecs.shape[1] != dim):
                    entry = None
                have.append((cid, entry, size))
        stale = [
            (cid, entry, size) for cid, entry, size in have if not entry or entry.nbytes < size
        ]
        pipe = self.redis.pipeline(transaction=False)
        for cid, entry, size in stale:
            pipe.getrange(k.vec(cid), entry.nbytes if entry else 0, size - 1)
        tails = dict(zip([c for c, _, _ in stale], pipe.execute() if stale else [], strict=True))
        dtype = _record_dtype(dim)
        out = []
        for cid, entry, _size in have:
            tail = tails.get(cid, b"")
            if tail:
                whole = len(tail) - len(tail) % dtype.itemsize
                records = np.frombuffer(tail, dtype=dtype, count=whole // dtype.itemsize)
                seqs = records["seq"].astype(np.int64)
                vecs = np.ascontiguousarray(records["vec"], dtype=np.float32)
                if entry is not None:
                    seqs = np.concatenate([entry.seqs, seqs])
                    vecs = np.concatenate([entry.vecs, vecs])
                entry = _Decoded((entry.nbytes if entry else 0) + whole, seqs, vecs)
                self.cache.put(k.vec(cid), entry)
            if entry is not None:
                out.append((cid, entry))
        return out

    def search(
        self,
        tenant: str,
        user_id: str,
        query: Vectors,
        k: int,
        *,
        conversation_ids: Sequence[str] | None = None,
        exclude: Collection[tuple[str, int]] = (),
    ) -> list[VectorHit]:
        q = normalise(query)[0]
        if conversation_ids is None:
            raw = cast(list[bytes], self.redis.zrange(Keys(tenant).user_convs(user_id), 0, -1))
            conversation_ids = [r.decode() for r in raw]
        loaded = self._load(tenant, conversation_ids, q.shape[0])
        if not loaded:
            return []
        skip: dict[str, list[int]] = {}
        for cid, seq in exclude:
            skip.setdefault(cid, []).append(seq)
        cids: list[str] = []
        owners, seq_parts, score_parts = [], [], []
        for cid, entry in loaded:
            seqs, scores = entry.seqs, entry.vecs @ q
            if cid in skip:
                keep = ~np.isin(seqs, np.asarray(skip[cid], dtype=np.int64))
                seqs, scores = seqs[keep], scores[keep]
            owners.append(np.full(len(seqs), len(cids), dtype=np.intp))
            cids.append(cid)
            seq_parts.append(seqs)
            score_parts.append(scores)
        return top_k(
            cids,
            np.concatenate(owners),
            np.concatenate(seq_parts),
            np.concatenate(score_parts).astype(np.float32),
            k,
        )

    def drop(self, tenant: str, conversation_id: str) -> None:
        k = Keys(tenant)
        self.redis.delete(k.vec(conversation_id), k.vecbits(conversation_id))
        self.cache.pop(k.vec(conversation_id))


# KEYS: meta, vecbits, then one document key per vector. ARGV: dim, user, cid, n, (seq, vec)...
_DOC_ADD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local dim = redis.call('HGET', KEYS[1], 'vec_dim')
if dim and dim ~= ARGV[1] then return -2 end
if not dim then redis.call('HSET', KEYS[1], 'vec_dim', ARGV[1]) end
local added = 0
for i = 1, tonumber(ARGV[4]) do
  local seq = ARGV[3 + 2 * i]
  if redis.call('SETBIT', KEYS[2], tonumber(seq), 1) == 0 then
    redis.call('HSET', KEYS[2 + i], 'user', ARGV[2], 'conv', ARGV[3], 'seq', seq,
        'vec', ARGV[4 + 2 * i])
    added = added + 1
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[1], 'embedded', added) end
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
return added
"""
_TAG_SPECIAL = re.compile(r"([^A-Za-z0-9_])")


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _documents(reply: Any) -> list[dict[bytes, Any]]:
    """The returned fields of each document of an ``FT.SEARCH`` reply: a RESP2 array
    (total, id, fields, id, fields, …) or a RESP3 map (``results``, each with
    ``extra_attributes``), which redis-py speaks depending on its version."""
    if isinstance(reply, dict):
        return [doc[b"extra_attributes"] for doc in reply[b"results"]]
    return [dict(zip(reply[i][::2], reply[i][1::2], strict=True)) for i in range(2, len(reply), 2)]


def _tag(value: str) -> str:
    return _TAG_SPECIAL.sub(r"\\\1", value)


class RediSearchIndex:
    """Exact (``FLAT``) cosine search in Redis' own vector index.

    Document hashes do not expire with their conversation (renewing thousands of TTLs on
    every message would not scale); a search drops hits whose conversation is gone and
    deletes that conversation's documents, and deleting a conversation deletes them too.
    """

    kind: str = "redisearch"

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._add = client.register_script(_DOC_ADD)
        self._indexes: set[str] = set()

    def _ensure(self, k: Keys, dim: int) -> str:
        name = k.index_name(dim)
        if name not in self._indexes:
            try:
                _command(
                    self.redis, "FT.CREATE", name, "ON", "HASH", "PREFIX", 1, k.vec_doc_prefix(dim),
                    "SCHEMA", "user", "TAG", "conv", "TAG", "seq", "NUMERIC",
                    "vec", "VECTOR", "FLAT", 6, "TYPE", "FLOAT32", "DIM", dim,
                    "DISTANCE_METRIC", "COSINE",
                )  # fmt: skip
            except ResponseError as exc:
                if "already exists" not in str(exc).lower():
                    raise
            self._indexes.add(name)
        return name

    def add(
        self, tenant: str, conversation_id: str, user_id: str, seqs: Sequence[int], vectors: Vectors
    ) -> int:
        if not len(seqs):
            return 0
        unit = normalise(vectors)
        dim = unit.shape[1]
        k = Keys(tenant)
        self._ensure(k, dim)
        cid = conversation_id
        args: list[int | str | bytes] = [dim, user_id, cid, len(seqs)]
        for seq, vec in zip(seqs, unit, strict=True):
            args += [int(seq), vec.tobytes()]
        docs = [k.vec_doc(dim, cid, int(s)) for s in seqs]
        added = int(self._add(keys=[k.conv(cid), k.vecbits(cid), *docs], args=args))
        if added == -2:
            log.warning(
                "conversation %s holds vectors of another dimension than %d; not stored", cid, dim
            )
        return max(added, 0)

    def search(
        self,
        tenant: str,
        user_id: str,
        query: Vectors,
        k: int,
        *,
        conversation_ids: Sequence[str] | None = None,
        exclude: Collection[tuple[str, int]] = (),
    ) -> list[VectorHit]:
        q = normalise(query)[0]
        keys = Keys(tenant)
        name = self._ensure(keys, q.shape[0])
        where = f"@user:{{{_tag(user_id)}}}"
        if conversation_ids is not None:
            if not conversation_ids:
                return []
            where += " @conv:{" + " | ".join(_tag(c) for c in conversation_ids) + "}"
        skip = set(exclude)
        while True:
            # Ask for enough that ties at the k-th score, exclusions and orphans still leave k.
            want = k + len(skip) + 16
            raw = _command(
                self.redis, "FT.SEARCH", name, f"({where})=>[KNN {want} @vec $q AS dist]",
                "PARAMS", 2, "q", q.tobytes(), "SORTBY", "dist", "ASC",
                "RETURN", 3, "conv", "seq", "dist", "LIMIT", 0, want, "DIALECT", 2,
            )  # fmt: skip
            hits, orphans = [], set()
            for fields in _documents(raw):
                cid = fields[b"conv"].decode()
                seq = int(fields[b"seq"])
                if (cid, seq) in skip:
                    continue
                if not self.redis.exists(keys.conv(cid)):
                    orphans.add(cid)
                    continue
                hits.append((cid, seq, 1.0 - float(fields[b"dist"])))
            for cid in orphans:
                self.drop(tenant, cid)
            if not orphans or len(hits) >= k:
                break
        cids = [h[0] for h in hits]
        owner = np.arange(len(hits), dtype=np.intp)
        seqs = np.array([h[1] for h in hits], dtype=np.int64)
        scores = np.array([h[2] for h in hits], dtype=np.float32)
        return top_k(cids, owner, seqs, scores, k)

    def drop(self, tenant: str, conversation_id: str) -> None:
        k = Keys(tenant)
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=f"{k.base}:vec:*:{conversation_id}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                self.redis.delete(*batch)
                batch.clear()
        if batch:
            self.redis.delete(*batch)
        self.redis.delete(k.vecbits(conversation_id))


def search_supported(client: redis.Redis) -> bool:
    """Whether the server has a query engine with vector fields (RediSearch ≥ 2.4)."""
    try:
        modules = cast(list[dict[bytes, object]], client.module_list())
    except ResponseError:
        modules = []
    for module in modules:
        name = module.get(b"name", b"")
        if name in (b"search", b"searchlight", b"ft"):
            version = module.get(b"ver", 0)
            return isinstance(version, int) and version >= MIN_SEARCH_VERSION
    try:
        _command(client, "FT._LIST")
    except ResponseError:
        return False
    return True


def detect_index(
    client: redis.Redis, mode: str = "auto", cache_bytes: int = 256 << 20
) -> VectorIndex:
    """The vector index for this server: ``auto`` uses Redis' own when it has one."""
    if mode == "scan":
        return ScanIndex(client, cache_bytes)
    supported = search_supported(client)
    if mode == "redisearch" and not supported:
        raise ConfigError(
            "CORRAL_MEMORY_VECTOR_INDEX=redisearch, but this Redis has no vector search "
            "(needs RediSearch ≥ 2.4: Redis Stack or Redis 8); use auto or scan"
        )
    if supported:
        return RediSearchIndex(client)
    return ScanIndex(client, cache_bytes)
