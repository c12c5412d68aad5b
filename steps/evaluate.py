"""Step 5: score base (adapter off) and tuned (adapter on) on the same held-out rows; log the samples table."""

from typing import Annotated, Any

from zenml import step

from llmtune.artifacts import Adapter, EvalReport, PreparedData, QuantizedBase
from llmtune.config import EvaluationConfig
from llmtune.evaluate import judge, scoring
from llmtune.model import backend_for
from steps import tracking


@step(experiment_tracker=True)
def evaluate(
    base: QuantizedBase,
    adapter: Adapter,
    data: PreparedData,
    cfg: EvaluationConfig,
    backend: str,
    champion: dict[str, Any] | None = None,
    champion_adapter: Adapter | None = None,
) -> Annotated[EvalReport, "eval_report"]:
    """Base vs tuned; with `champion` (the model's production version) it is scored too, for the promotion gate.

    `champion` is `cli.sources.Champion.describe()`; `champion_adapter` its adapter when it was
    trained on the same base (re-scored on these rows), else its recorded scores are carried over.
    The champion's version number is not an input here (see `describe`); the gate gets it.
    """
    chosen, note = backend_for(backend, adapter.config(), "evaluate")
    model = chosen.load_for_inference(base.path, adapter.path)
    tokenizer, prompts, rows = data.tokenizer(), data.eval_prompts(), data.split(PreparedData.EVAL)
    rescore = champion_adapter.path if champion_adapter is not None else None
    report = scoring.compare(model, tokenizer, rows, prompts, cfg, champion_adapter=rescore)
    if champion is not None:
        report["champion_scored_on"] = "these eval rows" if rescore else "its own eval set (recorded)"
        if not rescore:
            report.update({f"champion_{k}": v for k, v in champion["recorded"].items()})
    judge_client = judge.judge_from_config(cfg, api_key=_judge_key_from_secret(cfg))
    if judge_client:
        judge.add_judge_scores(report, judge_client)
    report["tuned_beats_base"] = report["tuned_eval_loss"] < report["base_eval_loss"]
    scores = {
        k: float(v) for k, v in report.items() if k.startswith(("base_", "tuned_", "champion_")) and _is_number(v)
    }
    tracking.record(
        metadata={
            **scores,
            "tuned_beats_base": report["tuned_beats_base"],
            "backend": chosen.NAME,
            **({"backend_note": note} if note else {}),
        },
        params=tracking.section_params("evaluation", cfg),
        metrics=scores,
    )
    tracking.on_model_version(scores)  # every run's model version carries its scores
    # The table view in the MLflow UI reads a logged table; the HTML is the same page as the ZenML visualization.
    tracking.log_table(scoring.sample_columns(report), "eval_samples.json")
    tracking.log_text(scoring.samples_html(report), "eval_samples.html")
    return report


def _judge_key_from_secret(cfg: EvaluationConfig) -> str | None:
    """The judge key from the configured ZenML secret; None lets the library read the environment variable."""
    if not (cfg.judge_url and cfg.judge_api_key_secret):
        return None
    from zenml.client import Client

    return Client().get_secret(cfg.judge_api_key_secret).secret_values.get("api_key")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
