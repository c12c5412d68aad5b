"""Step 6: merge the adapter into a 16-bit model, verify it, and export adapter + merged model + config."""

import tempfile
from pathlib import Path
from typing import Annotated, Any

import mlflow
from transformers import AutoTokenizer
from zenml import get_step_context, step

from llmtune import export as exporting
from llmtune.artifacts import Adapter, MergedModel, PreparedData, QuantizedBase
from llmtune.config import ExportConfig
from llmtune.data import read_eval_prompts
from steps._record import record, section_params


@step(experiment_tracker=True)
def merge_and_push(
    base: QuantizedBase,
    adapter: Adapter,
    data: PreparedData,
    eval_report: dict[str, Any],
    cfg: ExportConfig,
    resolved_config: str,
) -> tuple[Annotated[MergedModel, "merged_model"], Annotated[dict[str, Any], "export_report"]]:
    tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
    prompts = [p["prompt"] for p in read_eval_prompts(data.path)]
    report = exporting.export(base.path, adapter.path, tokenizer, prompts, cfg, tempfile.mkdtemp(prefix="llmtune-"))
    if cfg.output_dir:
        report.update(
            _write_local(
                Path(cfg.output_dir) / get_step_context().pipeline_run.name,
                adapter,
                report["merged_dir"],
                tokenizer,
                resolved_config,
            )
        )
    record(
        metadata={k: v for k, v in report.items() if k != "merged_dir"},
        params=section_params("export", cfg),
        metrics={"merge_check_max_logit_gap": report["merge_check_max_logit_gap"]},
    )
    if mlflow.active_run() is not None:
        mlflow.log_text(resolved_config, "config.yaml")
    return MergedModel(report["merged_dir"]), report


def _write_local(dest: Path, adapter: Adapter, merged_dir: str, tokenizer: Any, resolved_config: str) -> dict:
    adapter_dir = exporting.copy_tree(adapter.path, dest / "adapter")
    tokenizer.save_pretrained(adapter_dir)  # the training template travels with the adapter
    (adapter_dir / "llmtune_config.yaml").write_text(resolved_config)
    merged = exporting.copy_tree(merged_dir, dest / "merged")
    return {"adapter_path": str(adapter_dir.resolve()), "merged_path": str(merged.resolve())}
