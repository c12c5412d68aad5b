"""`python run.py compare`: the last runs of the finetune experiment side by side, and a plot of their loss curves.

Reads the MLflow store of the project's stack (the local SQLite store, or a recipe's tracking server), or the
one given with --tracking-uri. Prints a table of the params that differ and the key metrics, then one JSON line
with the same data for scripts, and writes a PNG of the train_loss curves (eval_loss dashed, where logged).

    python run.py compare                       # last 5 finished runs of 'finetune'
    python run.py compare --last 3 --all-params --plot /tmp/curves.png
    python run.py compare --include-failed --tracking-uri sqlite:///path/to/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from cli import compare

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = ROOT / "outputs" / "compare" / "loss_curves.png"


class _StackError(Exception):
    """The project's stack (and so its MLflow store) could not be selected."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run.py compare",
        description="Compare the last MLflow runs of a pipeline: differing params, key metrics, loss curves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--last", type=_positive_int, default=5, metavar="N", help="how many runs (default 5)")
    parser.add_argument("--experiment", default="finetune", help="MLflow experiment = pipeline name (default finetune)")
    parser.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help="where the loss-curve PNG goes (default outputs/compare/...)"
    )
    parser.add_argument("--all-params", action="store_true", help="also show the params equal in all runs")
    parser.add_argument("--include-failed", action="store_true", help="also show failed, killed and running runs")
    parser.add_argument("--tracking-uri", help="MLflow store to read (default: the project stack's tracker)")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        uri = args.tracking_uri or stack_tracking_uri()
        runs = compare.fetch_runs(uri, args.experiment, args.last, args.include_failed)
    except _StackError as err:
        return _fail(str(err))
    except compare.CompareError as err:
        return _fail(f"{err}; run `python run.py --pipeline finetune` first.")
    table = compare.comparison(runs, args.experiment, all_params=args.all_params)
    console = console or Console()
    console.print(compare.render_table(table))
    if table["hidden_params"]:
        console.print(f"{table['hidden_params']} params that do not differ are hidden (--all-params shows them)")
    plot = compare.plot_loss_curves(runs, args.plot)
    console.print(f"Loss curves: {plot}" if plot else "Loss curves: none logged (no train_loss metric)", markup=False)
    console.print(f"MLflow UI:   {ui_hint(uri)}", markup=False, soft_wrap=True)
    print(json.dumps({**table, "plot": str(plot) if plot else None, "tracking_uri": uri}), flush=True)
    return 0


def ui_hint(uri: str) -> str:
    """How to see these runs in the MLflow UI: a tracking server is already one; a local store needs `mlflow ui`.

    >>> ui_hint("https://mlflow.example")
    'open https://mlflow.example'
    >>> ui_hint("sqlite:////tmp/mlflow.db")
    'mlflow ui --backend-store-uri sqlite:////tmp/mlflow.db'
    """
    return f"open {uri}" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"


def stack_tracking_uri() -> str:
    """The tracking URI of the stack that `run.py --pipeline finetune` would use (created on first use)."""
    from cli.stack import RecipeError, mlflow_tracking_uri, use_project_stack

    try:
        use_project_stack()
        return mlflow_tracking_uri()
    except (RecipeError, RuntimeError) as err:
        raise _StackError(str(err)) from err


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
