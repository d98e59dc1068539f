"""The results as a rich table (and the targets they are held to)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

# The targets: added latency per step, dispatch throughput, fan-out time.
TARGETS = {
    "step_added_median_ms": 5.0,  # under
    "dispatch_ratio": 0.8,  # at least
    "fan_out_ratio": 1.2,  # at most
}


def verdicts(figures: dict[str, Any]) -> dict[str, bool | None]:
    """Whether each target is met (None when the figure was not measured)."""
    step, disp, fan = (figures.get(k) for k in ("step_overhead", "dispatch", "fan_out"))
    one = step.get("one_request_added_ms") if step else None
    return {
        # Submit, then a long-poll read: two requests.
        "step_added_median_ms": (
            step["added_ms"]["median"] < TARGETS["step_added_median_ms"] if step else None
        ),
        # A submit that waits for the end: one request.
        "step_added_one_request_median_ms": (
            one["median"] < TARGETS["step_added_median_ms"] if one else None
        ),
        "dispatch_ratio": (
            disp["ratio"] is not None and disp["ratio"] >= TARGETS["dispatch_ratio"]
            if disp
            else None
        ),
        "fan_out_ratio": (
            fan["ratio"] is not None and fan["ratio"] <= TARGETS["fan_out_ratio"] if fan else None
        ),
    }


def _mark(ok: bool | None) -> str:
    return {True: "[green]met[/green]", False: "[red]missed[/red]", None: ""}[ok]


def _ms(s: dict[str, Any], key: str = "median") -> str:
    return f"{s[key]:.2f} ms"


def _cpu(parts: dict[str, float]) -> str:
    detail = " + ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
    return f"{parts.get('total', 0.0):.1f} ms ({detail})"


def render(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the figures, the targets and the machine."""
    console = console or Console()
    figures: dict[str, Any] = result["figures"]
    met = verdicts(figures)
    table = Table(title="Corral against its baselines (medians; measured interleaved)")
    for col in ("figure", "Corral", "baseline", "result", "target", ""):
        table.add_column(col)
    if step := figures.get("step_overhead"):
        table.add_row(
            f"1. step overhead (1 generate step, n={step['n']}): submit, then read",
            f"{_ms(step['corral_ms'])} (p95 {_ms(step['corral_ms'], 'p95')})",
            f"llama.cpp direct {_ms(step['direct_ms'])} (p95 {_ms(step['direct_ms'], 'p95')})",
            f"+{_ms(step['added_ms'])} (p95 +{_ms(step['added_ms'], 'p95')})",
            "< 5 ms",
            _mark(met["step_added_median_ms"]),
        )
        if one := step.get("one_request_ms"):
            added = step["one_request_added_ms"]
            table.add_row(
                "   … one request (submit with wait_s)",
                f"{_ms(one)} (p95 {_ms(one, 'p95')})",
                "",
                f"+{_ms(added)} (p95 +{_ms(added, 'p95')})",
                "< 5 ms",
                _mark(met["step_added_one_request_median_ms"]),
            )
        parts = ", ".join(f"{k} {v:.2f}" for k, v in step["breakdown_median_ms"].items())
        bare_row = step.get("bare_celery_ms", {})
        table.add_row(
            "   where Corral's time goes (ms)",
            parts,
            f"bare Celery task {_ms(bare_row)} (p95 {_ms(bare_row, 'p95')})"
            if bare_row.get("n")
            else "",
            f"+{_ms(step['bare_celery_added_ms'])} for bare Celery" if bare_row.get("n") else "",
            "",
            "",
        )
    if disp := figures.get("dispatch"):
        table.add_row(
            f"2. dispatch throughput (n={disp['n']}, {disp['workers']} workers)",
            f"{disp['corral_per_s']['median']:.1f} workflows/s",
            f"bare Celery {disp['bare_per_s']['median']:.1f} tasks/s",
            f"{disp['ratio']:.2f}×",
            "≥ 0.8×",
            _mark(met["dispatch_ratio"]),
        )
        table.add_row(
            "   CPU per workflow / task",
            _cpu(disp["corral_cpu_ms_per_item"]),
            _cpu(disp["bare_cpu_ms_per_item"]),
            "",
            "",
            "",
        )
    if fan := figures.get("fan_out"):
        table.add_row(
            f"3. fan-out 1 → {fan['width']} → 1 ({fan['workers']} workers)",
            f"{fan['corral_ms']['median']:.0f} ms",
            f"bare chord {fan['bare_ms']['median']:.0f} ms",
            f"{fan['ratio']:.2f}×",
            "≤ 1.2×",
            _mark(met["fan_out_ratio"]),
        )
    if sub := figures.get("submission"):
        lat, floor = sub["latency_ms"], sub["healthz_latency_ms"]
        table.add_row(
            f"4. submission API (concurrency {sub['concurrency']})",
            f"{sub['accepted_per_s']['median']:.0f} accepted/s, "
            f"p50 {lat['p50']:.1f} / p99 {lat['p99']:.1f} ms",
            f"GET /healthz {sub['healthz_per_s']['median']:.0f}/s, "
            f"p50 {floor['p50']:.1f} / p99 {floor['p99']:.1f} ms",
            f"{sub['ratio_to_healthz']:.2f}× of the HTTP floor",
            "",
            "",
        )
    gpu = figures.get("gpu") or {}
    if gpu.get("run"):
        ceiling = f"{gpu['ceiling_tok_s']:.0f}" if gpu.get("ceiling_tok_s") else "unknown"
        table.add_row(
            f"5. GPU tokens/s ({gpu['model']}, {gpu['max_tokens']} tokens)",
            f"{gpu['corral_decode_tok_s']['median']:.1f} decode, "
            f"{gpu['corral_e2e_tok_s']['median']:.1f} end to end",
            f"direct {gpu['direct_decode_tok_s']['median']:.1f} decode, "
            f"{gpu['direct_e2e_tok_s']['median']:.1f} end to end",
            f"{gpu['decode_ratio']:.2f}× decode; ceiling {ceiling} tok/s",
            "",
            "",
        )
    else:
        table.add_row("5. GPU tokens/s", "not run", gpu.get("reason", ""), "", "", "")
    console.print(table)
    machine = result["machine"]
    console.print(
        "machine: "
        + "; ".join(
            f"{k} {v}"
            for k, v in machine.items()
            if k not in ("load_avg_start",) and v not in (None, [], "")
        )
    )
    start, end = machine.get("load_avg_start"), result.get("load_avg_end")
    console.print(f"load average at start {start}, at end {end}")


def markdown(result: dict[str, Any]) -> str:
    """The same figures as a Markdown table (what the README shows), with the machine."""
    figures: dict[str, Any] = result["figures"]
    met = verdicts(figures)
    yes = {True: "met", False: "**missed**", None: ""}
    rows = [
        "| figure | Corral | baseline | result | target |",
        "|---|---|---|---|---|",
    ]
    if step := figures.get("step_overhead"):
        c, d, a = step["corral_ms"], step["direct_ms"], step["added_ms"]
        rows.append(
            f"| 1. step overhead: one `generate` step, submit, then a long-poll read "
            f"(n={step['n']}) "
            f"| {c['median']:.1f} ms (p95 {c['p95']:.1f}) "
            f"| llama.cpp direct {d['median']:.1f} ms (p95 {d['p95']:.1f}) "
            f"| **+{a['median']:.1f} ms** added (p95 +{a['p95']:.1f}) "
            f"| < 5 ms: {yes[met['step_added_median_ms']]} |"
        )
        if one := step.get("one_request_ms"):
            oa = step["one_request_added_ms"]
            rows.append(
                f"| … the same step in one request (`POST …?wait_s=`) "
                f"| {one['median']:.1f} ms (p95 {one['p95']:.1f}) | "
                f"| **+{oa['median']:.1f} ms** added (p95 +{oa['p95']:.1f}) "
                f"| < 5 ms: {yes[met['step_added_one_request_median_ms']]} |"
            )
        if step.get("bare_celery_ms", {}).get("n"):
            b, ba = step["bare_celery_ms"], step["bare_celery_added_ms"]
            rows.append(
                f"| … the same call as one bare Celery task (send → result) | "
                f"| {b['median']:.1f} ms (p95 {b['p95']:.1f}) "
                f"| +{ba['median']:.1f} ms added (p95 +{ba['p95']:.1f}) | |"
            )
        parts = ", ".join(f"{k} {v:.1f}" for k, v in step["breakdown_median_ms"].items())
        rows.append(f"| … where Corral's time goes, submit then read (median ms) | {parts} | | | |")
        if one_parts := step.get("one_request_breakdown_median_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in one_parts.items())
            rows.append(f"| … where it goes in one request (median ms) | {parts} | | | |")
    if disp := figures.get("dispatch"):
        cc, bc = disp["corral_cpu_ms_per_item"], disp["bare_cpu_ms_per_item"]
        rows.append(
            f"| 2. dispatch throughput: {disp['n']} one-step workflows, "
            f"{disp['workers']} worker processes "
            f"| {disp['corral_per_s']['median']:.1f} workflows/s "
            f"| bare Celery {disp['bare_per_s']['median']:.1f} tasks/s "
            f"| **{disp['ratio']:.2f}×** | ≥ 0.8×: {yes[met['dispatch_ratio']]} |"
        )
        rows.append(
            f"| … CPU per workflow / task (ms) | {_cpu(cc)} | {_cpu(bc)} "
            f"| +{cc.get('total', 0) - bc.get('total', 0):.1f} ms | |"
        )
    if fan := figures.get("fan_out"):
        rows.append(
            f"| 3. fan-out 1 → {fan['width']} → 1 ({fan['workers']} worker processes) "
            f"| {fan['corral_ms']['median']:.0f} ms | bare chain + chord "
            f"{fan['bare_ms']['median']:.0f} ms | **{fan['ratio']:.2f}×** "
            f"| ≤ 1.2×: {yes[met['fan_out_ratio']]} |"
        )
    if sub := figures.get("submission"):
        lat, floor = sub["latency_ms"], sub["healthz_latency_ms"]
        rows.append(
            f"| 4. submission API, {sub['concurrency']} concurrent clients "
            f"| {sub['accepted_per_s']['median']:.0f} accepted/s, p50 {lat['p50']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms | `GET /healthz` {sub['healthz_per_s']['median']:.0f}/s, "
            f"p50 {floor['p50']:.1f} ms, p99 {floor['p99']:.1f} ms "
            f"| {sub['ratio_to_healthz']:.2f}× the HTTP floor | |"
        )
    gpu = figures.get("gpu") or {}
    if gpu.get("run"):
        rows.append(
            f"| 5. GPU decode tokens/s, {gpu['model']} "
            f"| {gpu['corral_decode_tok_s']['median']:.0f} "
            f"| direct {gpu['direct_decode_tok_s']['median']:.0f}; ceiling "
            f"{gpu.get('ceiling_tok_s') or 'unknown'} | {gpu['decode_ratio']:.2f}× | |"
        )
    else:
        rows.append(f"| 5. GPU tokens/s | not run: {gpu.get('reason', '')} | | | |")
    m = result["machine"]
    machine = (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM"
        + (f", {'; '.join(m['gpus'])}" if m.get("gpus") else ", no GPU")
        + f"; {m['os']}; Python {m['python']}, llama-cpp-python {m['llama_cpp_python']}, "
        f"Celery {m['celery']}, {m['database']}, Redis {m['redis']}; "
        f"load average {m.get('load_avg_start')} at the start, {result.get('load_avg_end')} "
        f"at the end; {m['date']}"
    )
    return "\n".join(rows) + f"\n\nMachine: {machine}.\n"
