"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) with its tokenizer, small Alpaca files, and an
isolated ZenML store for this test session (set before anything imports zenml)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["ZENML_CONFIG_PATH"] = tempfile.mkdtemp(prefix="llmtune-zenml-")
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from llmtune.config import ModelConfig, RunConfig  # noqa: E402
from llmtune.demo import build_demo_model, make_demo_rows, write_jsonl  # noqa: E402

# The finetune pipeline's steps in the order they run: what the pipeline tests expect to see completed.
FINETUNE_STEPS = [
    "prepare_dataset",
    "load_base_model",
    "inject_lora",
    "train_sft",
    "evaluate",
    "promotion_gate",
    "merge_and_push",
]


@pytest.fixture(scope="session")
def demo_rows() -> list[dict[str, str]]:
    return make_demo_rows(240, seed=3)


@pytest.fixture(scope="session")
def rows_file(tmp_path_factory: pytest.TempPathFactory, demo_rows: list[dict[str, str]]) -> Path:
    return write_jsonl(demo_rows, tmp_path_factory.mktemp("data") / "rows.jsonl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_rows: list[dict[str, str]]) -> Path:
    """A Llama of 2 layers, hidden 64, briefly pretrained on plain text, with a BPE tokenizer of the demo rows."""
    return build_demo_model(tmp_path_factory.mktemp("tiny") / "base", shape="tiny", rows=demo_rows, pretrain_steps=150)


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from llmtune.model import hf

    out = tmp_path_factory.mktemp("base4bit")
    hf.load_quantized(ModelConfig(name=str(tiny_model_dir)), out)
    return out


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory, rows_file: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from llmtune import data

    out = tmp_path_factory.mktemp("prepared")
    cfg = RunConfig.model_validate({"data": {"source": str(rows_file), "max_seq_length": 128}}).data
    data.prepare(cfg, AutoTokenizer.from_pretrained(tiny_model_dir), out)
    return out


def tiny_run_overrides(model_dir: Path, rows: Path, out_dir: Path, max_steps: int = 8) -> list[str]:
    """--set overrides that make the default pipeline run in well under a minute on the tiny model."""
    return [
        f"model.name={model_dir}",
        f"data.source={rows}",
        "model.backend=hf",
        f"training.max_steps={max_steps}",
        "training.logging_steps=2",
        "training.learning_rate=0.003",
        "evaluation.num_generation_prompts=4",
        "evaluation.max_new_tokens=6",
        "evaluation.max_eval_rows=16",
        f"export.output_dir={out_dir}",
        # the demo config's gate (exact match +0.05, promote to production) is not for a model this small and
        # brief; staging keeps one module's run from becoming the production that another module's must beat
        "promotion.metric=eval_loss",
        "promotion.min_improvement_over_base=0",
        "promotion.promote_to=staging",
    ]
