"""The ledger for people: a table on the terminal, ``ledger.md`` and a chart ``ledger.png``."""

from __future__ import annotations

import io
from typing import Any


def _usd(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "$0"
    return f"${x:,.4f}" if x < 1 else f"${x:,.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.0f}%"


def summary_lines(ledger: dict[str, Any]) -> list[str]:
    hours = ledger["gpu_seconds"] / 3600
    unit = "GPU" if ledger["device"] == "gpu" else "CPU-instance"
    per_m = ledger.get("usd_per_million_tokens")
    rps = ledger.get("rows_per_second_per_replica", 0.0)
    util = ledger.get("utilisation_assumed", 0.7)
    lines = [
        f"job {ledger['job']} ({ledger['task']}, {ledger['model']}): {ledger['rows']:,} rows, "
        f"{ledger['failed_rows']:,} failed, {ledger['input_tokens']:,} input + "
        f"{ledger['output_tokens']:,} output tokens",
        f"run: {hours:.4f} {unit}-hours x {_usd(ledger['gpu_hour_usd'])}/h = "
        f"{_usd(ledger['run_cost_usd'])} ({_usd(per_m)} per million tokens), "
        f"wall {ledger['wall_seconds']:,.0f}s; price table {ledger['price_table_version']}",
        f"measured {rps:,.2f} rows/s per replica: at {util:.0%} utilisation one replica "
        f"handles {rps * 86400 * util:,.0f} rows/day (compare with the break-even column)",
    ]
    return lines + _idle_line(ledger) + _typed_line(ledger) + _cache_line(ledger)


def _cache_line(ledger: dict[str, Any]) -> list[str]:
    c = ledger.get("cache")
    if not c:  # no result cache and no dedup counts (or an older ledger)
        return []
    saved = int(c["saved_input_tokens"]) + int(c["saved_output_tokens"])
    ours = c.get("saved_usd_at_our_rate")
    batch = sorted(c.get("saved_batch_usd", []), key=lambda b: b["batch_usd"])
    api = (
        f"; {_usd(batch[0]['batch_usd'])}-{_usd(batch[-1]['batch_usd'])} at API batch rates"
        if batch
        else ""
    )
    return [
        f"result cache: {c['hit_rows']:,} rows from the cache, {c['dedup_rows']:,} shared with "
        f"an equal prompt ({c['hit_rate']:.1%} of rows); {saved:,} tokens not processed, "
        f"worth {_usd(ours) if ours is not None else 'n/a'} at our rate{api}"
    ]


def _typed_line(ledger: dict[str, Any]) -> list[str]:
    if "resamples" not in ledger:  # not a typed job (no response:), or an older ledger
        return []
    discarded = int(ledger["discarded_output_tokens"])
    generated = int(ledger.get("generated_output_tokens", 0))
    share = f" ({discarded / generated:.1%} of generated)" if generated else ""
    return [
        f"typed answers: re-sampled {ledger['resamples']:,} times; {discarded:,} output "
        f"tokens discarded{share}; {ledger['schema_violations']:,} rows SchemaViolation"
    ]


def _idle_line(ledger: dict[str, Any]) -> list[str]:
    if "engine_idle_fraction" not in ledger:  # ledgers written before it was measured
        return []
    return [
        f"engines busy {ledger['engine_busy_seconds']:,.1f}s, idle "
        f"{ledger['engine_idle_fraction']:.1%} of their working window between chunks "
        "(model load excluded; raise resources.chunks_in_flight if this is high)"
    ]


def comparison_rows(ledger: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in ledger["comparisons"]:
        be = c.get("break_even_rows_per_day")
        rows.append(
            [
                f"{c['provider']}/{c['model']}",
                _usd(c["list_usd"]),
                _usd(c["batch_usd"]),
                _pct(c["savings_vs_batch"]),
                f"{be:,}" if be else "-",
            ]
        )
    return rows


HEADERS = ["comparator", "list price", "batch price", "savings vs batch", "break-even rows/day"]


def to_markdown(ledger: dict[str, Any]) -> str:
    out = [f"# Cost ledger: {ledger['job']}", ""]
    out += [f"- {line}" for line in summary_lines(ledger)]
    out += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    out += ["| " + " | ".join(r) + " |" for r in comparison_rows(ledger)]
    out += ["", "![ledger](ledger.png)", ""]
    out += [f"> {n}" for n in ledger.get("notes", [])]
    return "\n".join(out) + "\n"


def print_table(ledger: dict[str, Any]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # Piped output (logs, files) gets a width that fits the table instead of 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 130)
    for line in summary_lines(ledger):
        console.print(line)
    table = Table(*HEADERS)
    for r in comparison_rows(ledger):
        table.add_row(*r)
    console.print(table)
    console.print(f"[dim]{ledger.get('notes', [''])[0]}[/dim]")


def chart_png(ledger: dict[str, Any]) -> bytes:
    """Our run against each comparator's list and batch price, on one horizontal bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = ledger["comparisons"]
    labels = [f"{c['provider']}/{c['model']}" for c in comps]
    fig_h = 1.2 + 0.45 * (len(comps) + 1)
    fig, ax = plt.subplots(figsize=(9, fig_h), dpi=110)
    y = list(range(len(comps)))
    ax.barh([i + 0.2 for i in y], [c["list_usd"] for c in comps], height=0.38,
            color="#c9c9c9", label="API list price")  # fmt: skip
    ax.barh([i - 0.2 for i in y], [c["batch_usd"] for c in comps], height=0.38,
            color="#7a9cc6", label="API batch price")  # fmt: skip
    run = ledger["run_cost_usd"]
    ax.axvline(run, color="#d1495b", linewidth=2.5,
               label=f"this run: {_usd(run)} ({ledger['device']})")  # fmt: skip
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    values = [c["list_usd"] for c in comps] + [c["batch_usd"] for c in comps] + [run]
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("USD for the same tokens")
    ax.set_title(
        f"{ledger['job']}: {ledger['rows']:,} rows, "
        f"{ledger['input_tokens'] + ledger['output_tokens']:,} tokens",
        fontsize=11,
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
