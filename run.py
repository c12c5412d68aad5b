"""Command line for the fine-tuning pipelines.

    python run.py --pipeline finetune                       # default config: offline demo on the CPU
    python run.py --pipeline finetune --config configs/recipes/llama-3.2-1b-alpaca.yaml
    python run.py --pipeline finetune --set training.max_steps=5 --set model.backend=hf --no-cache
    python run.py compare --last 5                          # last MLflow runs: differing params, metrics, loss plot

Config problems (bad value, unknown key, missing file, unreadable data) are reported in one paragraph
with exit code 2 before any model is loaded; so are data problems the prepare step finds (a row the
chat template refuses, too few rows). Heavy imports happen only after validation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# name -> what it does (shown in --help). Each lives in pipelines/<name>.py and exposes
# `launch(cfg, enable_cache) -> int`, which runs it on the local stack and prints its summary.
PIPELINES = {
    "finetune": "all six steps: prepare, 4-bit load, LoRA, SFT, evaluate, merge/export",
    "export": "merge, verify, export and publish the adapter of an earlier finetune run (no training)",
    "evaluate": "score an earlier run's adapter, a model version or an adapter folder against its base (no training)",
    "prepare": "only dataset preparation; prints rows kept, drops, token lengths and a marked example",
}


def quiet_network_env() -> None:
    """Turn off telemetry and analytics that would try the network; keep the user's explicit settings."""
    for key, value in {
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ZENML_ENABLE_RICH_TRACEBACK": "false",
    }.items():
        os.environ.setdefault(key, value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="QLoRA fine-tuning pipeline (ZenML + MLflow).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="finetune",
        help="which pipeline to run: " + "; ".join(f"{name} = {what}" for name, what in PIPELINES.items()),
    )
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / "finetune.yaml"),
        help="YAML run config (default: configs/finetune.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable, e.g. --set training.max_steps=5",
    )
    parser.add_argument("--no-cache", action="store_true", help="re-run every step instead of reusing results")
    parser.add_argument(
        "--recipe",
        help="run on a cloud GPU stack from infrastructure/<RECIPE> (kubernetes, vertex, sagemaker, skypilot); "
        "default: $LLMTUNE_RECIPE, else the local stack",
    )
    parser.add_argument(
        "--schedule",
        metavar="CRON",
        help="instead of running now, run this same command on a cron schedule, e.g. '0 3 * * *' "
        "(a ZenML schedule where the orchestrator supports it, else a crontab entry)",
    )
    parser.add_argument("--list-schedules", action="store_true", help="list installed schedules and exit")
    parser.add_argument("--remove-schedule", metavar="NAME", help="remove a schedule by name and exit")
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # a subcommand with its own options, so it goes before the pipeline parser
        quiet_network_env()
        from pipelines.compare_runs import main as compare_runs

        return compare_runs(argv[1:])
    args = parse_args(argv)
    os.chdir(ROOT)  # relative paths in configs are relative to the project
    quiet_network_env()
    if args.recipe:
        os.environ["LLMTUNE_RECIPE"] = args.recipe  # read by pipelines.stack; carried into scheduled runs
    if args.list_schedules or args.remove_schedule:
        return manage_schedules(args.remove_schedule)
    from llmtune.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return fail(str(err))
    from llmtune.backends import import_unsloth_if_used

    import_unsloth_if_used(cfg.model.backend)  # before anything imports transformers, peft or trl
    from llmtune.preflight import PreflightError, check_inputs

    try:
        check_inputs(cfg)
    except PreflightError as err:
        return fail(str(err))
    if args.schedule:
        return schedule_pipeline(args.pipeline, cfg, args.schedule, argv)
    return run_pipeline(args.pipeline, cfg, enable_cache=not args.no_cache)


def schedule_pipeline(name: str, cfg: object, cron: str, argv: list[str]) -> int:
    from pipelines.schedule import ScheduleError, install, without_schedule_options
    from pipelines.stack import RecipeError

    try:
        return install(name, cfg, cron, without_schedule_options(argv))
    except (ScheduleError, RecipeError) as err:
        return fail(str(err))


def manage_schedules(remove: str | None) -> int:
    from pipelines.schedule import list_schedules, remove_schedule

    return remove_schedule(remove) if remove else list_schedules()


def run_pipeline(name: str, cfg: object, enable_cache: bool) -> int:
    import importlib

    from pipelines.stack import RecipeError, use_project_stack

    try:
        use_project_stack()  # $LLMTUNE_RECIPE's stack, else the local one
    except RecipeError as err:
        return fail(str(err))
    from llmtune.config import ConfigError
    from llmtune.data.errors import ERROR_FILE_ENV, left_for_cli

    with tempfile.TemporaryDirectory(prefix="llmtune-cli-") as scratch:
        os.environ[ERROR_FILE_ENV] = os.path.join(scratch, "data-error.txt")  # a step's DataError lands here
        try:
            return int(importlib.import_module(f"pipelines.{name}").launch(cfg, enable_cache))
        except ConfigError as err:  # e.g. a source run or model version that does not exist
            return fail(str(err))
        except Exception as err:  # the step logs above carry the detail; end with one clear line
            data_error = left_for_cli()  # a data problem the user can fix: its paragraph, exit 2
            if data_error:
                return fail(data_error)
            print(f"\nPipeline failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
