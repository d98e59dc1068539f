"""Corral's runtime call against ``llama_cpp.Llama`` as shipped, by completion length.

llama-cpp-python's ``create_completion`` detokenizes the whole completion after every
token, so its cost grows with the square of the length; Corral's runtime class converts
only the new tokens. Both load the same file the same way and make the same call (end of
sequence suppressed, so every completion has the asked length), interleaved::

    python -m benchmarks.runtime_cost [--model PATH] [--tokens 16,256,1024,4096] [--n 20]

Without ``--model`` it uses the generated tiny chat model, whose tokens cost almost
nothing to compute: the Python around llama.cpp is most of what is left. The figures are
CPU time per completion (medians) and whether both gave the same text.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.work import load_llama, no_eos


def _complete(llm: Any, tokens: int) -> tuple[float, str]:
    t0 = time.process_time()
    out = llm.create_completion(
        "Tell a long story", max_tokens=tokens, temperature=0, logits_processor=no_eos(llm)
    )
    used_ms = (time.process_time() - t0) * 1000
    if out["usage"]["completion_tokens"] != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, got {out['usage']}")
    text: str = out["choices"][0]["text"]
    return used_ms, text


def measure(model: Path, lengths: list[int], n: int, n_ctx: int) -> list[dict[str, Any]]:
    """Per length: CPU ms per completion, as shipped and through Corral's class."""
    shipped = load_llama(model, n_ctx, plain=True)
    corral = load_llama(model, n_ctx)
    rows: list[dict[str, Any]] = []
    try:
        for tokens in lengths:
            times: dict[str, list[float]] = {"shipped": [], "corral": []}
            texts: dict[str, set[str]] = {"shipped": set(), "corral": set()}
            rounds = max(3, n if tokens <= 256 else n // 4)
            for i in range(rounds):
                order = [("shipped", shipped), ("corral", corral)]
                for name, llm in order if i % 2 == 0 else order[::-1]:
                    used_ms, text = _complete(llm, tokens)
                    times[name].append(used_ms)
                    texts[name].add(text)
            s, c = statistics.median(times["shipped"]), statistics.median(times["corral"])
            rows.append(
                {
                    "tokens": tokens,
                    "rounds": rounds,
                    "shipped_cpu_ms": round(s, 2),
                    "corral_cpu_ms": round(c, 2),
                    "speedup": round(s / c, 2),
                    "same_text": texts["shipped"] == texts["corral"],
                }
            )
    finally:
        shipped.close()
        corral.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a GGUF file (default: the tiny chat model)")
    p.add_argument("--tokens", default="16,256,1024,4096", help="completion lengths")
    p.add_argument("--n", type=int, default=20, help="rounds per length (a quarter past 256)")
    p.add_argument("--n-ctx", type=int, default=8192)
    args = p.parse_args(argv)
    lengths = [int(t) for t in args.tokens.split(",")]
    with tempfile.TemporaryDirectory(prefix="corral-runtime-cost-") as tmp:
        model = args.model
        if model is None:
            from models.tiny import make_tiny

            make_tiny(Path(tmp))
            model = Path(tmp) / "tiny-chat.gguf"
        rows = measure(model, lengths, args.n, args.n_ctx)
    table = Table(title=f"CPU per completion, {model.name} (medians, interleaved)")
    for col in ("tokens", "llama_cpp.Llama", "Corral's runtime class", "speedup", "same text"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["tokens"]),
            f"{r['shipped_cpu_ms']:.1f} ms",
            f"{r['corral_cpu_ms']:.1f} ms",
            f"{r['speedup']:.2f}×",
            "yes" if r["same_text"] else "NO",
        )
    Console().print(table)
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
