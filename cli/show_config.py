"""`python run.py config`: the config a run would use, as YAML, each key with its description and default.

    python run.py config                                        # configs/finetune.yaml, resolved
    python run.py config --config configs/recipes/llama-3.2-1b-alpaca.yaml --set training.max_steps=5
    python run.py config --schema                               # JSON Schema of every section and key

The printed YAML loads back as a config (`python run.py config > my.yaml`, then `--config my.yaml`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.config_options import add_config_options
from llmtune.config import RunConfig, annotated_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str], default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run.py config",
        description="Print the resolved run config with each key's description and default, or its JSON Schema.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_options(parser, default_config)
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of the config instead")
    return parser.parse_args(argv)


def main(argv: list[str], default_config: str) -> int:
    args = parse_args(argv, default_config)
    if args.schema:
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    cfg = load_config(args.config, args.overrides)
    shown = Path(args.config).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"# Resolved from {shown}" + "".join(f" --set {item}" for item in args.overrides))
    print(annotated_yaml(cfg), end="")
    return 0
