"""Step 6: the promotion gate. Does the tuned model beat its base by the margin, and not fall behind production?

Its own node in the DAG, so the verdict shows on the run (step metadata, the model version, MLflow tags)
before anything is merged. A run whose adapter is production's own (a scheduled run on unchanged data
and config, training cached) is UNCHANGED: nothing to merge, publish or promote. Not cached: production
may have changed since the same inputs were last judged.
"""

from typing import Annotated, Any

from zenml import get_step_context, step

from llmtune.artifacts import Adapter, EvalReport
from llmtune.config import PromotionConfig
from llmtune.release import promotion
from steps import tracking


@step(experiment_tracker=True, enable_cache=False)
def promotion_gate(
    eval_report: EvalReport,
    adapter: Adapter,
    cfg: PromotionConfig,
    champion_version: str | None = None,
    champion_adapter_id: str | None = None,
) -> Annotated[dict[str, Any], "verdict"]:
    if champion_adapter_id and str(get_step_context().inputs["adapter"][0].id) == champion_adapter_id:
        verdict = promotion.unchanged(champion_version)
    else:
        verdict = promotion.decide(eval_report, cfg, champion_version).as_metadata()
    print(verdict["gate_verdict"], flush=True)
    tracking.record(metadata=verdict)
    tracking.on_model_version(verdict)
    tracking.set_tags({"llmtune.verdict": promotion.verdict_tag(verdict), "llmtune.gate": verdict["gate_verdict"]})
    return verdict
