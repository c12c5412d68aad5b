"""Compare the last runs of an MLflow experiment: the params that differ, the key metrics, the loss curves.

Every finetune pipeline run is one MLflow run with dotted params (`training.max_steps`, `lora.r`, ...), a
`train_loss` curve (and an `eval_loss` curve with `training.eval_steps`) and `base_*`/`tuned_*` eval metrics.
This module reads them back through `MlflowClient` and needs no ZenML: `fetch_runs` -> `comparison` (a JSON-able
dict) -> `render_table` and `plot_loss_curves`.

Example (the pure part):
    >>> runs = [
    ...     RunSummary("b2", "run-b", "FINISHED", 2000, {"lora.r": "16", "training.max_steps": "40"},
    ...                {"tuned_eval_loss": 1.04}, {"llmtune.verdict": "promoted"}, [(10, 2.1), (40, 1.3)]),
    ...     RunSummary("a1", "run-a", "FINISHED", 1000, {"lora.r": "16", "training.max_steps": "20"},
    ...                {"tuned_eval_loss": 1.52}, {}, [(10, 2.2), (20, 1.9)]),
    ... ]
    >>> table = comparison(runs, "finetune")
    >>> table["params"], table["hidden_params"]
    ({'training.max_steps': ['40', '20']}, 1)
    >>> table["metrics"]
    {'final_train_loss': [1.3, 1.9], 'tuned_eval_loss': [1.04, 1.52]}
    >>> [run["verdict"] for run in table["runs"]]
    ['promoted', None]
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from llmtune.errors import LlmtuneError

LOSS_CURVE = "train_loss"
EVAL_CURVE = "eval_loss"  # the held-out loss computed during training (training.eval_steps)
FINAL_LOSS = "final_train_loss"
BEST_EVAL_LOSS = "best_eval_loss"  # the lowest eval_loss during training
VERDICT_TAG = "llmtune.verdict"
MAX_PARAM_WIDTH = 40  # long values (a judge prompt, a path) would make one column swallow the table


class CompareError(LlmtuneError, ValueError):
    """No runs to compare: the experiment is missing or has no runs of the wanted status."""


@dataclass(frozen=True)
class RunSummary:
    """What a comparison needs from one MLflow run."""

    run_id: str
    name: str
    status: str
    start_time: int  # milliseconds since the epoch, as MLflow stores it
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    loss_curve: list[tuple[int, float]]  # (step, train_loss), by step
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss) in training


def fetch_runs(tracking_uri: str, experiment: str, last: int = 5, include_failed: bool = False) -> list[RunSummary]:
    """The newest `last` runs of `experiment` (FINISHED only unless `include_failed`), newest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        raise CompareError(f"MLflow experiment '{experiment}' does not exist in {tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="" if include_failed else "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    if not runs:
        kind = "runs" if include_failed else "finished runs (--include-failed shows the others)"
        raise CompareError(f"MLflow experiment '{experiment}' in {tracking_uri} has no {kind}")
    return [_summarize(client, run) for run in runs]


def _curve(client: Any, run_id: str, name: str) -> list[tuple[int, float]]:
    history = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
    return [(int(m.step), float(m.value)) for m in history]


def _summarize(client: Any, run: Any) -> RunSummary:
    return RunSummary(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
        loss_curve=_curve(client, run.info.run_id, LOSS_CURVE),
        eval_curve=_curve(client, run.info.run_id, EVAL_CURVE),
    )


def differing_params(params_per_run: Sequence[dict[str, str]]) -> tuple[list[str], int]:
    """The param names with more than one value among the runs that logged them, sorted, and how many names
    were left out. A run without a param does not make it differ: a step that ZenML served from its cache
    logs nothing to the new run, so a run that reused the prepared data has no `data.*` params at all.

    >>> differing_params([{"lr": "0.1", "r": "16"}, {"lr": "0.3", "r": "16"}, {"lr": "0.1"}])
    (['lr'], 1)
    >>> differing_params([{"r": "16"}])
    ([], 1)
    """
    names = sorted({name for params in params_per_run for name in params})
    differing = [name for name in names if len({params[name] for params in params_per_run if name in params}) > 1]
    return differing, len(names) - len(differing)


def key_metric_names(names: Iterable[str]) -> list[str]:
    """The metrics worth a row, in table order: the final train loss, then base and tuned eval loss, then each
    generation metric (exact match, ROUGE-L, judge score, ...) base before tuned. Perplexity is left out, since
    it is exp(eval loss).

    >>> key_metric_names(["tuned_rouge_l", "train_seconds", "base_eval_loss", "tuned_eval_loss",
    ...                   "tuned_perplexity", "base_rouge_l", "final_train_loss", "tuned_bleu"])
    ['final_train_loss', 'base_eval_loss', 'tuned_eval_loss', 'tuned_bleu', 'base_rouge_l', 'tuned_rouge_l']
    """
    present = set(names)
    scored = {name.split("_", 1)[1] for name in present if name.startswith(("base_", "tuned_"))}
    generation = sorted(scored - {"eval_loss", "perplexity"})
    candidates = [FINAL_LOSS, BEST_EVAL_LOSS, "base_eval_loss", "tuned_eval_loss"]
    candidates += [f"{side}_{metric}" for metric in generation for side in ("base", "tuned")]
    return [name for name in candidates if name in present]


def final_train_loss(run: RunSummary) -> float | None:
    """The last point of the loss curve, else the run's `final_train_loss` metric, else None."""
    return run.loss_curve[-1][1] if run.loss_curve else run.metrics.get(FINAL_LOSS)


def comparison(runs: Sequence[RunSummary], experiment: str, all_params: bool = False) -> dict[str, Any]:
    """The comparison as plain data (what the table shows and the JSON line carries); runs in the given order."""
    shown, hidden = differing_params([run.params for run in runs])
    if all_params:
        shown, hidden = sorted({name for run in runs for name in run.params}), 0
    metrics = [{**run.metrics, FINAL_LOSS: final_train_loss(run)} for run in runs]
    names = key_metric_names(name for values in metrics for name, value in values.items() if value is not None)
    return {
        "experiment": experiment,
        "runs": [_run_header(run) for run in runs],
        "params": {name: [run.params.get(name) for run in runs] for name in shown},
        "hidden_params": hidden,
        "metrics": {name: [values.get(name) for values in metrics] for name in names},
    }


def _run_header(run: RunSummary) -> dict[str, Any]:
    started = dt.datetime.fromtimestamp(run.start_time / 1000, tz=dt.UTC)
    return {
        "run_id": run.run_id,
        "run_name": run.name,
        "status": run.status,
        "start_time": started.isoformat(timespec="seconds"),
        "verdict": run.tags.get(VERDICT_TAG),
    }


def render_table(table: dict[str, Any]) -> Table:
    """A rich table with one column per run (newest left): start, status and verdict where they tell something,
    then the params, then the metrics."""
    runs = table["runs"]
    view = Table(title=f"Last {len(runs)} run(s) of MLflow experiment '{table['experiment']}', newest first")
    view.add_column("")
    for run in runs:
        view.add_column(run["run_name"], overflow="fold")
    view.add_row("started (UTC)", *(run["start_time"].replace("T", " ")[:16] for run in runs))
    if any(run["status"] != "FINISHED" for run in runs):
        view.add_row("status", *(run["status"] for run in runs))
    if any(run["verdict"] for run in runs):
        view.add_row("verdict", *(run["verdict"] or "-" for run in runs))
    view.add_section()
    for name, values in table["params"].items():
        view.add_row(name, *(_short(value) for value in values))
    view.add_section()
    for name, numbers in table["metrics"].items():
        view.add_row(name, *("-" if number is None else f"{number:.4g}" for number in numbers))
    return view


def _short(value: str | None) -> str:
    """A param value cut to the column width; a param a run does not have shows as '-'.

    >>> _short(None), _short("0.001"), len(_short("x" * 100))
    ('-', '0.001', 40)
    """
    if value is None:
        return "-"
    return value if len(value) <= MAX_PARAM_WIDTH else value[: MAX_PARAM_WIDTH - 1] + "…"


def plot_loss_curves(runs: Sequence[RunSummary], path: str | Path) -> Path | None:
    """Write a PNG with one train_loss line per run, labelled by run name, and the run's eval_loss during
    training as a dashed line of the same colour; None when no run has a curve."""
    curves = [run for run in runs if run.loss_curve or run.eval_curve]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in curves:
        color = None
        if run.loss_curve:
            steps, losses = zip(*run.loss_curve, strict=True)
            (line,) = ax.plot(steps, losses, marker=".", label=run.name)
            color = line.get_color()
        if run.eval_curve:
            steps, losses = zip(*run.eval_curve, strict=True)
            ax.plot(steps, losses, linestyle="--", marker="o", color=color, label=f"{run.name} ({EVAL_CURVE})")
    with_eval = any(run.eval_curve for run in curves)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{LOSS_CURVE}, {EVAL_CURVE} (dashed)" if with_eval else LOSS_CURVE)
    ax.set_title(f"{LOSS_CURVE}{' and ' + EVAL_CURVE if with_eval else ''} by step, {len(curves)} run(s)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
