"""The `--config` and `--set` options, the same for a run (`run.py`) and for printing its config (`run.py config`).

Only argparse is imported: `run.py` parses its arguments before any heavy import.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_config_options(parser, "configs/finetune.yaml")
    >>> vars(parser.parse_args(["--set", "training.max_steps=5", "--set", "model.backend=hf"]))
    {'config': 'configs/finetune.yaml', 'overrides': ['training.max_steps=5', 'model.backend=hf']}
"""

from __future__ import annotations

import argparse


def add_config_options(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help="YAML run config (default: configs/finetune.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable, e.g. --set training.max_steps=5 "
        "(python run.py config lists every key with its description and default)",
    )
