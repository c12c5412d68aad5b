"""Step 5: score base (adapter off) and tuned (adapter on) on the same held-out rows."""

from pathlib import Path
from typing import Annotated, Any

from datasets import load_from_disk
from transformers import AutoTokenizer
from zenml import step

from llmtune import evaluation
from llmtune.artifacts import Adapter, PreparedData, QuantizedBase
from llmtune.backends import resolve_backend
from llmtune.config import EvaluationConfig
from llmtune.data import read_eval_prompts
from steps._record import record, section_params


@step(experiment_tracker=True)
def evaluate(
    base: QuantizedBase, adapter: Adapter, data: PreparedData, cfg: EvaluationConfig, backend: str
) -> Annotated[dict[str, Any], "eval_report"]:
    model = resolve_backend(backend).load_for_inference(base.path, adapter.path)
    tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
    prompts = read_eval_prompts(data.path)
    report = evaluation.compare(model, tokenizer, load_from_disk(str(Path(data.path) / "eval")), prompts, cfg)
    report["tuned_beats_base"] = report["tuned_eval_loss"] < report["base_eval_loss"]
    scores = {k: float(v) for k, v in report.items() if k.startswith(("base_", "tuned_")) and k != "tuned_beats_base"}
    record(
        metadata={**scores, "tuned_beats_base": report["tuned_beats_base"]},
        params=section_params("evaluation", cfg),
        metrics=scores,
    )
    return report
