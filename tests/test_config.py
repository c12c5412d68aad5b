"""Config loading, overrides and the CLI's clear errors (exit 2, no traceback, before any model loads)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmtune.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_repeatable() -> None:
    cfg = load_config(None, ["training.max_steps=5", "model.backend=hf", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.training.max_steps == 5
    assert cfg.model.backend == "hf"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_file_values_override_defaults_and_set_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 7\n  learning_rate: 0.01\n")
    cfg = load_config(path, ["training.max_steps=9"])
    assert (cfg.training.max_steps, cfg.training.learning_rate) == (9, 0.01)
    assert cfg.lora.r == RunConfig().lora.r


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "must_mention"),
    [
        ("training:\n  max_stpes: 5\n", [], "training.max_stpes"),
        ("", ["training.max_stpes=5"], "max_steps"),
        ("", ["nosection.x=1"], "Allowed sections"),
        ("", ["training.max_steps"], "section.key=value"),
        ("training:\n  max_steps: -1\n", [], "training.max_steps"),
        ("model:\n  backend: tpu\n", [], "model.backend"),
        ("lora:\n  r: 1\n  alpha: 1000\n", [], "lora.alpha"),
        ("[1, 2]\n", [], "mapping"),
        ("training: {max_steps: [\n", [], "not valid YAML"),
        ("training:\n  max_steps: 200\n", ["training.num_train_epochs=2"], "training.max_steps=200 and training.num"),
        ("", ["training.max_steps=null"], "set training.max_steps or training.num_train_epochs"),
        ("", ["training.early_stopping_patience=3"], "set training.eval_steps too"),
        ("", ["lora.init=loftq"], "lora.init=loftq is not one of"),
        ("lora:\n  use_dora: true\n  init: olora\n", [], "lora.use_dora=true"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, overrides: list[str], must_mention: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(must_mention)):
        load_config(path, overrides)


def test_epochs_alone_replace_the_default_steps() -> None:
    training = load_config(None, ["training.num_train_epochs=1.5"]).training
    assert (training.max_steps, training.num_train_epochs) == (None, 1.5)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("args", "must_mention"),
    [
        (["--set", "training.max_stpes=5"], "training.max_stpes"),
        (["--config", "does/not/exist.yaml"], "does/not/exist.yaml"),
        (["--set", "data.source=missing/rows.jsonl"], "missing/rows.jsonl"),
        (["--set", "model.name=/no/such/model/dir"], "/no/such/model/dir"),
        (["--set", "model.name=assets/demo-bse"], "Did you mean 'assets/demo-base'?"),
        (["--set", "model.name=owner/not-in-cache"], "HF_TOKEN"),  # offline here: conftest sets HF_HUB_OFFLINE
    ],
)
def test_cli_rejects_bad_input_with_exit_2_and_no_traceback(args: list[str], must_mention: str) -> None:
    result = run_cli("--pipeline", "finetune", *args)
    assert result.returncode == 2, result.stderr
    assert must_mention in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("content", "must_mention"),
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2: malformed JSON"),
        ('{"instruction": "a"}\n', "line 1: missing field 'output'"),
        ('{"instruction": "a", "output": 3}\n', "field 'output' must be a string"),
    ],
)
def test_cli_rejects_bad_data_files(tmp_path: Path, content: str, must_mention: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    result = run_cli("--set", f"data.source={path}", "--set", "model.name=/no/model/needed")
    assert result.returncode == 2
    assert must_mention in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_non_utf8_data(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"))
    result = run_cli("--set", f"data.source={path}")
    assert result.returncode == 2 and "not UTF-8" in result.stderr


def test_help_lists_options() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--pipeline", "--config", "--set", "--no-cache"):
        assert option in result.stdout


def test_checkpoint_dir_must_be_a_file_system_path_not_a_url() -> None:
    with pytest.raises(ConfigError, match=r"training\.checkpoint_dir=s3://bucket/ckpt is a URL"):
        load_config(None, ["training.checkpoint_dir=s3://bucket/ckpt"])
    assert load_config(None, ["training.checkpoint_dir=/gcs/bucket/ckpt"]).training.checkpoint_dir == "/gcs/bucket/ckpt"


def test_an_earlier_runs_config_with_keys_since_removed_still_loads() -> None:
    stored = RunConfig().model_dump()
    stored["export"]["require_improvement"] = True  # a key older versions had
    assert RunConfig.from_stored(stored).export == RunConfig().export


def test_every_config_key_has_a_description() -> None:
    undescribed = [
        f"{section}.{key}"
        for section in RunConfig.model_fields
        for key, field in type(getattr(RunConfig(), section)).model_fields.items()
        if not field.description
    ]
    assert undescribed == []


def test_config_command_prints_the_resolved_config_described_and_loadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import run

    assert run.main(["config", "--set", "training.max_steps=7", "--set", "lora.r=8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Resolved from configs/finetune.yaml --set training.max_steps=7 --set lora.r=8\n")
    lines = text.splitlines()
    at = lines.index("  max_steps: 7")
    described = " ".join(line.removeprefix("  # ") for line in lines[at - 2 : at])  # wrapped onto two lines
    assert described.startswith("Optimizer steps to run") and described.endswith("(default: 300; changed)")
    assert "  # LoRA rank. (default: 16; changed)" in lines
    assert "  # Hub model revision (branch, tag or commit). (default: null)" in lines  # unchanged: no mark
    keys = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.startswith("  #")]
    assert len(keys) == sum(len(section) for section in RunConfig().model_dump().values())
    assert all(lines[i - 1].startswith("  # ") for i in keys), "every key is preceded by its description"
    saved = tmp_path / "resolved.yaml"
    saved.write_text(text)
    assert load_config(saved) == load_config(ROOT / "configs/finetune.yaml", ["training.max_steps=7", "lora.r=8"])


def test_config_command_schema_has_the_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import run

    assert run.main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$defs"]["TrainingConfig"]["properties"]["max_steps"]["description"].startswith("Optimizer steps")


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "suggestion"),
    [
        ("", ["training.max_stpes=5"], "Did you mean 'max_steps'"),
        ("", ["training.batch_size=5"], "Did you mean 'per_device_train_batch_size'"),
        ("", ["evaluation.optim=sgd"], "Did you mean 'training.optim'"),
        ("", ["trainig.max_steps=5"], "Did you mean 'training'"),
        ("lora:\n  rank: 8\n", [], "Unknown key 'lora.rank' (from file"),
        ("lora:\n  alpah: 8\n", [], "Did you mean 'alpha'"),
        ("modle:\n  name: x\n", [], "Unknown section 'modle' (from file"),
        ("modle:\n  name: x\n", [], "Did you mean 'model'"),
    ],
)
def test_unknown_key_suggests_the_closest(
    tmp_path: Path, yaml_text: str, overrides: list[str], suggestion: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(suggestion)):
        load_config(path, overrides)


def test_a_bad_override_is_blamed_on_its_set_and_a_bad_file_value_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 5\n  learning_rate: 2.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["training.max_steps=many"])
    message = str(caught.value)
    assert "'training.max_steps' = 'many' (from --set 'training.max_steps=many') is invalid" in message
    assert f"'training.learning_rate' = 2.0 (from file '{path}') is invalid" in message
