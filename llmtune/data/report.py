"""What preparation did, for people: length percentiles, a histogram, drop counts, a marked example.

The same stats render three ways: rich text for the terminal (`python run.py --pipeline prepare`),
self-contained HTML with an SVG histogram (the ZenML dashboard visualization and an MLflow artifact),
and a PNG plot for MLflow.

Example:
    >>> length_summary([10, 20, 30, 40])
    {'min': 10, 'p5': 10, 'p50': 30, 'p90': 40, 'p95': 40, 'p99': 40, 'max': 40, 'mean': 25.0}
    >>> histogram([1, 2, 2, 9], bins=2)
    {'edges': [1, 5, 9], 'counts': [3, 1]}
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtune.data.encode import IGNORE

PERCENTILES = (5, 50, 90, 95, 99)
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # around trained tokens in the printed example; colour may be lost
PREFERENCE_USE = {
    "dpo": "DPO pairs: trained on the chosen answers, rejected ones ignored",
    "kto": "KTO rows: trained on those labelled true, false ones dropped (undesirable)",
}


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """Min, nearest-rank percentiles, max and mean of the token lengths."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    pct = {f"p{p}": ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] for p in PERCENTILES}
    return {"min": ordered[0], **pct, "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


def histogram(lengths: Sequence[int], bins: int = 20) -> dict[str, list[int]]:
    """Equal-width bins over [min, max]: `edges` has bins+1 integers, `counts` has bins."""
    if not lengths:
        return {"edges": [], "counts": []}
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low) // bins))  # ceiling division, at least one token wide
    edges = [low + i * width for i in range(bins + 1)]
    counts = [0] * bins
    for length in lengths:
        counts[min(bins - 1, (length - low) // width)] += 1
    while len(counts) > 1 and counts[-1] == 0:  # no empty bins past the longest example
        counts.pop()
        edges.pop()
    return {"edges": edges, "counts": counts}


def marked_segments(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[list[Any]]:
    """The example as [text, trained] runs: consecutive tokens with the same loss flag decoded together."""
    segments: list[list[Any]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            segments.append([tokenizer.decode(list(input_ids[start:i])), labels[start] != IGNORE])
            start = i
    return segments


def summary_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs shared by the text and HTML reports."""
    lengths = stats["token_length"]
    rows = [
        ("source", str(stats["source"])),
        ("format", f"{stats['format']}" + (" (detected)" if stats["format_detected"] else "")),
        ("chat template", str(stats["template"])),
    ]
    if stats.get("preference"):
        rows.append(("preference data", PREFERENCE_USE[stats["preference"]]))
    rows += [("rows in", str(stats["rows_in"])), ("rows kept", str(stats["rows_kept"]))]
    if stats.get("sources"):
        rows += [("mix", str(stats["mix"]))] + [(source["key"], source_line(source)) for source in stats["sources"]]
    rows += [(f"dropped: {reason}", str(n)) for reason, n in stats["dropped"].items()]
    if stats["truncated"]:
        rows.append(("truncated to max_seq_length", str(stats["truncated"])))
    if stats.get("unused_columns"):
        rows.append(("unused columns", ", ".join(stats["unused_columns"])))
    if stats.get("empty_answers_masked"):
        rows.append(("empty answers (masked, not trained)", str(stats["empty_answers_masked"])))
    if stats.get("split_conversations"):
        rows.append(("conversations trained one sequence per answer", str(stats["split_conversations"])))
    if stats.get("non_text_parts_dropped"):
        rows.append(("non-text content parts dropped", str(stats["non_text_parts_dropped"])))
    rows += [
        ("train / eval rows", f"{stats['train_rows']} / {stats['eval_rows']} (eval: {stats['eval_from']})"),
        ("token length", "  ".join(f"{k} {v}" for k, v in lengths.items())),
        ("trained tokens", f"{stats['trained_tokens']} of {stats['train_tokens']} train tokens"),
        ("fingerprint", str(stats["fingerprint"])),
    ]
    return rows


def source_line(source: dict[str, Any]) -> str:
    """One source of a mix in the report: its name, format, counts, share of the kept rows and drops.

    >>> source_line({"name": "a.jsonl", "format": "alpaca", "rows_in": 40, "drawn": 30, "rows_kept": 29,
    ...     "share": 0.7436, "target_share": 0.75, "train_rows": 26, "eval_rows": 3,
    ...     "dropped": {"over_weight": 10, "too_long": 1}})
    'a.jsonl (alpaca): 40 in, 30 drawn, 29 kept = 74.4% of the mix (weight share 75.0%), train/eval 26/3; \
dropped: over_weight 10, too_long 1'
    """
    target = f" (weight share {source['target_share']:.1%})" if source.get("target_share") is not None else ""
    line = (
        f"{source['name']} ({source['format']}): {source['rows_in']} in, {source['drawn']} drawn, "
        f"{source['rows_kept']} kept = {source['share']:.1%} of the mix{target}, "
        f"train/eval {source['train_rows']}/{source['eval_rows']}"
    )
    dropped = ", ".join(f"{reason} {n}" for reason, n in source["dropped"].items())
    return line + (f"; dropped: {dropped}" if dropped else "")


def print_report(stats: dict[str, Any], console: Any = None) -> None:
    """Print the summary, the first bad rows, the histogram and one example with its trained tokens marked."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title="Dataset preparation", show_header=False)
    for label, value in summary_rows(stats):
        table.add_row(label, value)
    console.print(table)
    for message in stats.get("first_errors", []):
        console.print(f"  skipped: {message}", style="yellow", markup=False)
    if stats.get("first_split"):
        console.print(f"  split, e.g. {stats['first_split']}", markup=False)
    for line in warning_lines(stats):
        console.print(line, style="bold yellow", markup=False, soft_wrap=True)
    console.print(_text_histogram(stats["length_histogram"]))
    example = Text()
    for text, trained in stats["example"]:
        example.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text, style=_style(trained))
    console.print(f"Example (tokens carrying loss are between {TRAINED_OPEN} and {TRAINED_CLOSE}, on green):")
    console.print(example, markup=False, highlight=False)


def marked_text(segments: Sequence[Sequence[Any]]) -> str:
    """The example as plain text with the trained runs between brackets, readable without colour (logs, pipes).

    >>> marked_text([["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", False], ["Hello<|im_end|>", True]])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[[Hello<|im_end|>]]'
    """
    return "".join(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text for text, trained in segments)


def _style(trained: bool) -> str:
    return "bold black on green" if trained else "dim"


def warning_lines(stats: dict[str, Any]) -> list[str]:
    """The preparation's warnings (too many rows dropped, unused columns), one line each, for any report.

    >>> warning_lines({"warnings": ["Columns not used for training: id."]})
    ['Data warning: Columns not used for training: id.']
    """
    return [f"Data warning: {message}" for message in stats.get("warnings", [])]


def _text_histogram(hist: dict[str, list[int]], width: int = 40) -> str:
    peak = max(hist["counts"], default=1) or 1
    lines = ["Token lengths:"]
    for low, high, count in zip(hist["edges"], hist["edges"][1:], hist["counts"], strict=False):
        lines.append(f"  {low:>6}-{high - 1:<6} {'#' * round(width * count / peak):<{width}} {count}")
    return "\n".join(lines)


def to_html(stats: dict[str, Any]) -> str:
    """A self-contained HTML page: counts table, SVG token-length histogram, the marked example."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(stats))
    errors = "".join(f"<li>{html.escape(m)}</li>" for m in stats.get("first_errors", []))
    warnings = "".join(f"<p class='w'>{html.escape(m)}</p>" for m in warning_lines(stats))
    example = "".join(
        f'<span class="{"t" if trained else "p"}">{html.escape(text)}</span>' for text, trained in stats["example"]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Dataset preparation</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}th,td{padding:2px 8px;"
        "text-align:left;border-bottom:1px solid #ddd}pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}"
        ".t{background:#b7e4b7}.p{color:#777}.w{background:#fff3cd;padding:6px}</style></head><body>"
        f"<h2>Dataset preparation</h2>{warnings}<table>{rows}</table>"
        + (f"<h3>First skipped rows</h3><ul>{errors}</ul>" if errors else "")
        + f"<h3>Token lengths</h3>{_svg_histogram(stats['length_histogram'])}"
        + f"<h3>Example (green tokens carry loss)</h3><pre>{example}</pre></body></html>"
    )


def _svg_histogram(hist: dict[str, list[int]], width: int = 640, height: int = 220) -> str:
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return "<p>no rows</p>"
    peak, bar = max(counts) or 1, (width - 60) / len(counts)
    bars = []
    for i, count in enumerate(counts):
        h = (height - 50) * count / peak
        x, y = 50 + i * bar, height - 30 - h
        label = f"{edges[i]}-{edges[i + 1] - 1} tokens: {count} rows"
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="#4c78a8">'
            f"<title>{label}</title></rect>"
        )
    axis = (
        f'<text x="50" y="{height - 10}" font-size="11">{edges[0]}</text>'
        f'<text x="{width - 10}" y="{height - 10}" font-size="11" text-anchor="end">{edges[-1]} tokens</text>'
        f'<text x="45" y="20" font-size="11" text-anchor="end">{peak}</text>'
    )
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{"".join(bars)}{axis}</svg>'


def save_length_plot(stats: dict[str, Any], path: str | Path) -> Path:
    """The token-length histogram as a PNG (for MLflow, which shows images inline)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    hist = stats["length_histogram"]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.stairs(hist["counts"], hist["edges"], fill=True)
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("rows")
    ax.set_title(f"Token lengths (p50 {stats['token_length'].get('p50')}, max {stats['token_length'].get('max')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
