"""Where relative paths point: typed on the command line, the folder the command runs in; in a config file, next to
the file, else the project folder; defaults, the project folder. Through `load_config` and through `run.py` started
from another folder (the shipped configs keep reading the project's demo data and model from there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.schedule import cron_command
from llmtune.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BAD_AT_LINE_2 = '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n'


def touch(base: Path, *names: str) -> None:
    """Create files (and, for names ending in '/', folders) under `base`."""
    for name in names:
        path = base / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")


def test_command_line_paths_are_relative_to_where_the_command_runs(tmp_path: Path) -> None:
    touch(tmp_path, "rows.jsonl", "held.jsonl", "chat.jinja", "models/tiny/", "data/demo/instructions.jsonl")
    overrides = [
        "data.source=rows.jsonl",
        "data.eval_split=held.jsonl",
        "data.chat_template=chat.jinja",
        "model.name=models/tiny",
        "export.output_dir=runs",
        "training.checkpoint_dir=ckpt",
        "source.adapter=models/tiny",
    ]
    cfg = load_config(None, overrides, cwd=tmp_path)
    assert (cfg.data.source, cfg.data.eval_split, cfg.data.chat_template) == (
        str(tmp_path / "rows.jsonl"),
        str(tmp_path / "held.jsonl"),
        str(tmp_path / "chat.jinja"),
    )
    assert cfg.model.name == cfg.source.adapter == str(tmp_path / "models" / "tiny")
    assert (cfg.export.output_dir, cfg.training.checkpoint_dir) == (str(tmp_path / "runs"), str(tmp_path / "ckpt"))
    # the project has a file of the same name, but a path typed here means the one here
    assert load_config(None, ["data.source=data/demo/instructions.jsonl"], cwd=tmp_path).data.source == str(
        tmp_path / "data" / "demo" / "instructions.jsonl"
    )


def test_names_that_are_not_paths_stay_names(tmp_path: Path) -> None:
    overrides = [
        "data.source=yahma/alpaca-cleaned",
        "model.name=meta-llama/Llama-3.2-1B-Instruct",
        "data.eval_split=test",
        "data.chat_template=gemma",
    ]
    cfg = load_config(None, overrides, cwd=tmp_path)
    assert (cfg.data.source, cfg.model.name) == ("yahma/alpaca-cleaned", "meta-llama/Llama-3.2-1B-Instruct")
    assert (cfg.data.eval_split, cfg.data.chat_template) == ("test", "gemma")
    assert load_config(None, ["data.source=missing/rows.jsonl"], cwd=tmp_path).data.source == str(
        tmp_path / "missing" / "rows.jsonl"
    ), "a missing file is named where it was looked for"


def test_config_file_paths_are_next_to_the_file_else_in_the_project(tmp_path: Path) -> None:
    touch(tmp_path, "exp/rows.jsonl", "exp/chat.jinja", "rows.jsonl")
    (tmp_path / "exp" / "my.yaml").write_text(
        "data:\n  source: rows.jsonl\n  chat_template: chat.jinja\n"
        "model:\n  name: assets/demo-base\nexport:\n  output_dir: outputs\n"
    )
    cfg = load_config("exp/my.yaml", cwd=tmp_path)
    assert (cfg.data.source, cfg.data.chat_template) == (
        str(tmp_path / "exp/rows.jsonl"),
        str(tmp_path / "exp/chat.jinja"),
    )
    assert (cfg.model.name, cfg.export.output_dir) == (str(ROOT / "assets/demo-base"), str(ROOT / "outputs"))
    overridden = load_config("exp/my.yaml", ["data.source=rows.jsonl"], cwd=tmp_path)
    assert overridden.data.source == str(tmp_path / "rows.jsonl"), "--set overrides the file, from where it is typed"


@pytest.mark.parametrize("config", [ROOT / "configs" / "finetune.yaml", None], ids=["finetune.yaml", "defaults"])
def test_shipped_config_and_defaults_read_the_projects_files_from_any_folder(tmp_path: Path, config: Path) -> None:
    for folder in (ROOT, tmp_path):
        cfg = load_config(config, cwd=folder)
        assert cfg.data.source == str(ROOT / "data" / "demo" / "instructions.jsonl")
        assert Path(cfg.data.source).is_file()
        assert (cfg.model.name, cfg.export.output_dir) == (str(ROOT / "assets" / "demo-base"), str(ROOT / "outputs"))


def test_a_relative_config_path_is_looked_for_where_the_command_runs(tmp_path: Path) -> None:
    assert load_config("configs/finetune.yaml", cwd=ROOT).data.max_seq_length == 128
    with pytest.raises(ConfigError) as raised:
        load_config("configs/finetune.yaml", cwd=tmp_path)
    assert str(raised.value).startswith(
        f"Config file 'configs/finetune.yaml' does not exist (looked for {tmp_path / 'configs' / 'finetune.yaml'}"
    )


def run_from(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400"}  # the report's table keeps long paths on one line
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=600, cwd=folder, env=env
    )


def test_run_py_started_elsewhere_reads_the_config_and_data_named_from_there(tmp_path: Path) -> None:
    """Each file is bad at a known line, so the error shows which file was read (before any model is needed)."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "rows.jsonl").write_text(BAD_AT_LINE_2)
    (tmp_path / "exp" / "my.yaml").write_text("data:\n  source: rows.jsonl\nmodel:\n  name: owner/any-model\n")
    (tmp_path / "mine.jsonl").write_text('{"instruction": "a"}\n')

    from_file = run_from(tmp_path, "--config", "exp/my.yaml")
    assert from_file.returncode == 2, from_file.stderr
    assert f"error: data.source: {tmp_path / 'exp' / 'rows.jsonl'}, line 2: malformed JSON" in from_file.stderr

    from_set = run_from(tmp_path, "--config", "exp/my.yaml", "--set", "data.source=mine.jsonl")
    assert from_set.returncode == 2, from_set.stderr
    assert f"{tmp_path / 'mine.jsonl'}, line 1: missing field 'output'" in from_set.stderr

    missing = run_from(tmp_path, "--config", "nope.yaml")
    assert missing.returncode == 2 and f"looked for {tmp_path / 'nope.yaml'}" in missing.stderr
    assert "Traceback" not in from_file.stderr + from_set.stderr + missing.stderr


def test_a_schedule_runs_from_the_folder_it_was_made_in(tmp_path: Path) -> None:
    command = cron_command(["--config", "my.yaml"], {}, "finetune-0a1b2c3d", started_in=tmp_path)
    assert command.startswith(f"cd {tmp_path} && ") and f"{ROOT / 'run.py'} --config my.yaml" in command


@pytest.mark.pipeline
def test_prepare_runs_from_another_folder_on_its_config_data_and_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from llmtune.demo import make_demo_rows, write_jsonl

    folder = tmp_path / "elsewhere"
    write_jsonl(make_demo_rows(40, seed=5), folder / "exp" / "rows.jsonl")
    (folder / "exp" / "my.yaml").write_text("data:\n  source: rows.jsonl\n  max_seq_length: 128\n")
    model = os.path.relpath(tiny_model_dir, folder)
    done = run_from(folder, "--pipeline", "prepare", "--config", "exp/my.yaml", "--set", f"model.name={model}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"source\s+│ {re.escape(str(folder / 'exp' / 'rows.jsonl'))}", done.stdout), done.stdout
    assert re.search(r"rows in\s+│ 40 ", done.stdout), done.stdout
