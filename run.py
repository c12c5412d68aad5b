"""Command line for the fine-tuning pipelines.

    python run.py --pipeline finetune                       # default config: offline demo on the CPU
    python run.py --pipeline finetune --config configs/recipes/llama-3.2-1b-alpaca.yaml
    python run.py --pipeline finetune --set training.max_steps=5 --set model.backend=hf --no-cache
    python run.py compare --last 5                          # last MLflow runs: differing params, metrics, loss plot
    python run.py config --set training.max_steps=5         # the resolved config: every key, described, defaults
    python run.py chat                                      # talk to the newest run's tuned model (chat --help)

A relative path given with --config or --set is read from the folder you run the command in; one inside a
config file, next to that file, else in the project folder. Config problems (bad value, unknown key,
missing file, unreadable data) are reported in one paragraph
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
DEFAULT_CONFIG = str(ROOT / "configs" / "finetune.yaml")
# name -> what it does (shown in --help). Each is defined in pipelines/<name>.py and launched by
# cli.launch.LAUNCHERS[name](cfg, enable_cache), which runs it on the active stack and prints its summary.
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
    from cli.config_options import add_config_options

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
    add_config_options(parser, DEFAULT_CONFIG)
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
    """Parse, then run; every error a user can fix (`llmtune.errors.LlmtuneError`, found before the pipeline or
    inside a step) ends here as one paragraph with exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    from llmtune.errors import LlmtuneError

    try:
        return dispatch(argv)
    except LlmtuneError as err:
        return fail(str(err))


def compare_command(argv: list[str]) -> int:
    from cli.compare_runs import main as compare_runs

    return compare_runs(argv)


def chat_command(argv: list[str]) -> int:
    from cli.chat import main as chat

    return chat(argv)


def config_command(argv: list[str]) -> int:
    from cli.show_config import main as show_config

    return show_config(argv, DEFAULT_CONFIG)


# Subcommands with their own options, tried before the pipeline parser: `python run.py NAME [options]`.
SUBCOMMANDS = {"chat": chat_command, "compare": compare_command, "config": config_command}


def dispatch(argv: list[str]) -> int:
    if argv[:1] and argv[0] in SUBCOMMANDS:
        quiet_network_env()
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    started_in = Path.cwd()  # paths typed with --config and --set are relative to it (llmtune/paths.py)
    os.chdir(ROOT)  # the project's own folders (outputs/, the local ZenML repository) are found from here
    quiet_network_env()
    if args.recipe:
        os.environ["LLMTUNE_RECIPE"] = args.recipe  # read by cli.stack; carried into scheduled runs
    if args.list_schedules or args.remove_schedule:
        from cli.schedule import list_schedules, remove_schedule

        return remove_schedule(args.remove_schedule) if args.remove_schedule else list_schedules()
    if args.schedule:  # before the other checks, which may build the demo base
        from cli.schedule import check_cron

        check_cron(args.schedule)
    from llmtune.config import load_config

    cfg = load_config(args.config, args.overrides, cwd=started_in)
    from llmtune.model import import_unsloth_if_used

    import_unsloth_if_used(cfg.model.backend)  # before anything imports transformers, peft or trl
    from llmtune.preflight import check_inputs

    check_inputs(cfg)
    if args.schedule:
        from cli.schedule import install, without_schedule_options

        return install(args.pipeline, cfg, args.schedule, without_schedule_options(argv), started_in=started_in)
    return run_pipeline(args.pipeline, cfg, enable_cache=not args.no_cache)


def run_pipeline(name: str, cfg: object, enable_cache: bool) -> int:
    from cli.launch import LAUNCHERS
    from cli.stack import use_project_stack
    from llmtune.errors import ERROR_FILE_ENV, LlmtuneError, left_for_cli

    use_project_stack()  # $LLMTUNE_RECIPE's stack, else the local one
    with tempfile.TemporaryDirectory(prefix="llmtune-cli-") as scratch:
        os.environ[ERROR_FILE_ENV] = os.path.join(scratch, "error.txt")  # a failed step's LlmtuneError lands here
        try:
            return LAUNCHERS[name](cfg, enable_cache)  # type: ignore[arg-type]
        except LlmtuneError:
            raise
        except Exception as err:  # the step logs above carry the detail; end with one clear line
            left = left_for_cli()  # a step stopped on a problem the user can fix: its paragraph, exit 2
            if left:
                return fail(left)
            print(f"\nPipeline failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        finally:
            os.environ.pop(ERROR_FILE_ENV, None)


if __name__ == "__main__":
    sys.exit(main())
