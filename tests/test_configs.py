"""Every shipped YAML under configs/ validates and starts with a comment saying what it is for and how to run it."""

from pathlib import Path

import pytest

from llmtune.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs() -> None:
    assert any(p.name == "finetune.yaml" for p in CONFIGS)
    assert any("recipes" in p.parts for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid_and_documented(path: Path) -> None:
    load_config(path)
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith("#"), "first line must say what the config is for"
    assert any("python run.py" in line for line in head), "the header must give the exact command"
