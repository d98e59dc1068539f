"""``python -m benchmarks.run [--quick] [--json out.json]``: every figure, one table.

Starts its own Redis and SQLite (or uses ``CORRAL_BENCH_REDIS_URL`` /
``CORRAL_BENCH_DATABASE_URL``), writes the tiny models to a temporary directory, starts
``corral api``, ``corral worker --model tiny-chat`` and a bare Celery worker with the same
concurrency, then measures each figure against its baseline, interleaved. With
``--gpu-model PATH`` it also measures figure 5 on that GGUF (on GPU ``--gpu-device``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.client import KINDS
from benchmarks.report import TARGETS, markdown, render, verdicts

FIGURES = ("step_overhead", "dispatch", "fan_out", "submission", "gpu")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a short pass (small N, one round)")
    p.add_argument("--json", type=Path, help="write every figure and the machine here")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(FIGURES)}")
    p.add_argument("--workers", type=int, default=2, help="worker processes, both sides")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each step generates")
    p.add_argument("--step-n", type=int, help="step-overhead pairs (default 200; quick 10)")
    p.add_argument("--dispatch-n", type=int, help="workflows per dispatch round (200; 20)")
    p.add_argument("--rounds", type=int, help="rounds of dispatch/fan-out/submission (5; 1)")
    p.add_argument("--fan-out-width", type=int, default=50)
    p.add_argument("--submit-n", type=int, help="submissions per round (500; 40)")
    p.add_argument("--submit-concurrency", type=int, default=8)
    p.add_argument("--log-level", default="INFO", help="of the Corral and bare processes")
    p.add_argument(
        "--http-client",
        choices=KINDS,
        default="stdlib",
        help="what drives the API: http.client keep-alive (default) or httpx",
    )
    p.add_argument("--api-workers", type=int, default=1, help="`corral api --workers`")
    g = p.add_argument_group("figure 5 (GPU)")
    g.add_argument("--gpu-model", type=Path, help="a real-size chat GGUF to measure on the GPU")
    g.add_argument("--gpu-device", default="0", help="GPU index ('none': the path on CPU)")
    g.add_argument("--gpu-n-ctx", type=int, default=4096)
    g.add_argument("--gpu-max-tokens", type=int, default=256)
    g.add_argument("--gpu-n", type=int, default=5, help="interleaved pairs")
    g.add_argument("--gpu-bandwidth-gbs", type=float, help="peak memory bandwidth, GB/s")
    args = p.parse_args(argv)
    quick = args.quick
    args.step_n = args.step_n or (10 if quick else 200)
    args.dispatch_n = args.dispatch_n or (20 if quick else 200)
    args.rounds = args.rounds or (1 if quick else 5)
    args.submit_n = args.submit_n or (40 if quick else 500)
    args.only = set(args.only.split(",")) if args.only else set(FIGURES)
    unknown = args.only - set(FIGURES)
    if unknown:
        p.error(f"--only knows {', '.join(FIGURES)}; got {', '.join(sorted(unknown))}")
    if args.gpu_model is not None and not args.gpu_model.is_file():
        p.error(f"--gpu-model {args.gpu_model} is not a file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that the table stays readable
        console = Console(width=170)
    if args.gpu_model is not None and args.gpu_device.isdigit():
        # Before llama.cpp initialises in this process: the direct side uses the same GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu_device

    from benchmarks import machine, overhead
    from benchmarks.stack import GpuModel, start_stack
    from benchmarks.work import GenCall, load_llama

    gpu = GpuModel(args.gpu_model, args.gpu_n_ctx, args.gpu_device) if args.gpu_model else None
    console.print("starting Redis, the database, corral api, corral worker, bare Celery …")
    stack = start_stack(
        workers=args.workers,
        log_level=args.log_level,
        gpu=gpu,
        http_client=args.http_client,
        api_workers=args.api_workers,
    )
    figures: dict[str, Any] = {}
    try:
        settings = stack.settings
        result: dict[str, Any] = {
            "machine": machine.describe(settings.sqlalchemy_url, settings.broker_url),
        }
        call = GenCall(max_tokens=args.max_tokens)
        result["config"] = {
            "quick": args.quick,
            "workers": args.workers,
            "call": call.as_dict(),
            "model": "tiny-chat",
            "log_level": args.log_level,
            "http_client": args.http_client,
            "api_workers": args.api_workers,
            "targets": TARGETS,
        }
        from app.core.config import use_settings
        from models.catalog import load_catalog

        n_ctx = load_catalog(settings.catalog_path).get("tiny-chat").n_ctx
        with use_settings(settings):
            if "step_overhead" in args.only:
                console.print("1. step overhead …")
                llm = load_llama(stack.chat_model_path, n_ctx)
                try:
                    figures["step_overhead"] = overhead.step_overhead(
                        stack, llm, call, args.step_n, warmup=max(3, args.step_n // 20)
                    )
                finally:
                    llm.close()
            if "dispatch" in args.only:
                console.print("2. dispatch throughput …")
                figures["dispatch"] = overhead.dispatch(
                    stack, call, args.dispatch_n, args.rounds, args.submit_concurrency
                )
            if "fan_out" in args.only:
                console.print("3. fan-out …")
                figures["fan_out"] = overhead.fan_out(
                    stack, call, args.fan_out_width, max(args.rounds, 3 if not args.quick else 1)
                )
            if "submission" in args.only:
                console.print("4. submission API …")
                figures["submission"] = overhead.submission(
                    stack, args.submit_n, args.submit_concurrency, args.rounds
                )
            if "gpu" in args.only and gpu is not None:
                from benchmarks.gpu import gpu_tokens

                console.print("5. GPU tokens/s …")
                gcall = GenCall(
                    prompt="Write a long story about a lighthouse keeper.",
                    max_tokens=args.gpu_max_tokens,
                    ignore_eos=True,
                )
                figures["gpu"] = {
                    "run": True,
                    **gpu_tokens(stack, gcall, args.gpu_n, args.gpu_bandwidth_gbs, machine.gpus()),
                }
            else:
                figures["gpu"] = {
                    "run": False,
                    "reason": "no --gpu-model given"
                    if "gpu" in args.only
                    else "not selected by --only",
                }
        result["figures"] = figures
        result["targets_met"] = verdicts(figures)
        result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except BaseException:
        console.print(f"[red]benchmark failed[/red]; process logs:\n{stack.logs()}")
        raise
    finally:
        stack.stop()
    render(result, console)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(markdown(result))
        console.print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"took {time.monotonic() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
