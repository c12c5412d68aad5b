"""The promotion gate: the verdict logic, then real runs on an isolated ZenML store that promote, get rejected
against production, and are re-scored by `--pipeline evaluate` without training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llmtune.config import ConfigError, PromotionConfig, load_config
from llmtune.release.promotion import decide, gain
from tests.conftest import tiny_run_overrides

MODEL = "gate-tiny"


def test_loss_and_perplexity_improve_downwards_the_rest_upwards() -> None:
    assert gain("eval_loss", 0.9, 1.0) == pytest.approx(0.1)
    assert gain("perplexity", 3.0, 2.0) == pytest.approx(-1.0)
    assert gain("exact_match", 0.6, 0.5) == pytest.approx(0.1)


def test_margin_over_base_is_required() -> None:
    report = {"base_rouge_l": 0.40, "tuned_rouge_l": 0.43}
    assert decide(report, PromotionConfig(metric="rouge_l", min_improvement_over_base=0.02)).passed
    verdict = decide(report, PromotionConfig(metric="rouge_l", min_improvement_over_base=0.05))
    assert not verdict.passed
    assert verdict.text.startswith("REJECTED") and "promotion.min_improvement_over_base" in verdict.text


def test_falling_behind_production_rejects_unless_within_the_allowed_regression() -> None:
    report = {"base_eval_loss": 2.0, "tuned_eval_loss": 1.10, "champion_eval_loss": 1.00}
    strict = decide(report, PromotionConfig(), champion_version="3")
    assert not strict.passed and "production version 3" in strict.text
    assert strict.gain_over_champion == pytest.approx(-0.1)
    lenient = decide(report, PromotionConfig(max_regression_vs_production=0.15), champion_version="3")
    assert lenient.passed and "against production version 3" in lenient.text


def test_a_metric_the_report_lacks_is_named_with_the_ones_it_has() -> None:
    with pytest.raises(KeyError, match="has: eval_loss"):
        decide({"base_eval_loss": 1.0, "tuned_eval_loss": 0.5}, PromotionConfig(metric="bleu"))


def test_gate_metric_must_be_one_the_evaluation_computes() -> None:
    with pytest.raises(ConfigError, match=r"not in evaluation\.metrics"):
        load_config(None, ["promotion.metric=bleu", "evaluation.metrics=[exact_match]"])
    with pytest.raises(ConfigError, match=r"needs evaluation\.judge_url"):
        load_config(None, ["promotion.metric=judge_score"])
    assert load_config(None, ["promotion.metric=exact_match", "evaluation.metrics=[rouge_l]"])


# ---- real runs on the isolated store (conftest) ----


def cli(pipeline: str, overrides: list[str]) -> int:
    import run as entry

    return entry.main(["--pipeline", pipeline, *(a for o in overrides for a in ("--set", o))])


def latest_run(pipeline: str):
    from zenml.client import Client

    return Client().list_pipeline_runs(pipeline_name=pipeline, sort_by="desc:created", size=1).items[0]


def mlflow_run(name: str, experiment: str = "finetune"):
    from mlflow.tracking import MlflowClient

    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    run_id = mlflow_run_id(name, experiment)
    assert run_id
    return MlflowClient(tracking_uri=mlflow_tracking_uri()).get_run(run_id)


def eval_report(run):
    from cli.summary import step_output

    return step_output(run, "evaluate", "eval_report")


@pytest.fixture(scope="module")
def champion(tiny_model_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gate-out")
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, out, max_steps=12),
        f"export.zenml_model={MODEL}",
        "promotion.promote_to=production",
        "export.formats=[adapter]",
        "export.publish_format=adapter",
    ]
    assert cli("finetune", overrides) == 0
    return {"run": latest_run("finetune"), "overrides": overrides, "out": out}


@pytest.mark.pipeline
def test_a_passing_run_is_promoted_and_its_version_carries_scores_and_verdict(champion: dict) -> None:
    from zenml.client import Client

    run = champion["run"]
    production = Client().get_model_version(MODEL, "production")
    assert run.name in production.pipeline_runs
    assert production.run_metadata["gate_passed"] is True
    scores: dict[str, Any] = dict(production.run_metadata)
    assert scores["tuned_eval_loss"] < scores["base_eval_loss"]
    assert mlflow_run(run.name).data.tags["llmtune.verdict"] == "promoted"
    assert (champion["out"] / run.name / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.pipeline
def test_a_rerun_on_unchanged_data_and_config_trains_merges_and_promotes_nothing(champion: dict) -> None:
    from zenml.client import Client

    assert cli("finetune", champion["overrides"]) == 0  # what a scheduled run does
    rerun = latest_run("finetune")
    assert rerun.steps["train_sft"].status.value == "cached"
    step = rerun.steps["promotion_gate"]
    assert step.run_metadata["gate_unchanged"] is True and "UNCHANGED" in step.run_metadata["gate_verdict"]
    step = rerun.steps["merge_and_push"]
    assert "merge_check_passed" not in step.run_metadata, "nothing merged"
    assert not (champion["out"] / rerun.name).exists(), "nothing exported"
    production = Client().get_model_version(MODEL, "production")
    assert champion["run"].name in production.pipeline_runs, "the earlier version stays production"
    assert mlflow_run(rerun.name).data.tags["llmtune.verdict"] == "unchanged"


@pytest.fixture(scope="module")
def challenger(champion: dict) -> dict:
    """A run that barely trains (1 step at a tiny learning rate): it beats nothing, so production must stop it."""
    overrides = [
        *champion["overrides"],
        "training.max_steps=1",
        "training.learning_rate=0.00001",
        "promotion.min_improvement_over_base=-100",  # isolate the production comparison
    ]
    assert cli("finetune", overrides) == 0, "a rejected run is a verdict, not an error"
    return {"run": latest_run("finetune")}


@pytest.mark.pipeline
def test_a_run_worse_than_production_is_rejected_and_neither_merged_nor_promoted(
    champion: dict, challenger: dict
) -> None:
    from zenml.client import Client

    report = eval_report(challenger["run"])
    # production was re-scored on the same held-out rows: it reproduces the champion's own tuned score
    assert report["champion_eval_loss"] == pytest.approx(eval_report(champion["run"])["tuned_eval_loss"], abs=1e-4)
    assert report["champion_scored_on"] == "these eval rows"
    assert {"champion", "prompt", "tuned"} <= set(report["samples"][0])
    gate = challenger["run"].steps["promotion_gate"]
    assert gate.run_metadata["gate_passed"] is False
    assert "falls behind production version" in gate.run_metadata["gate_verdict"]
    step = challenger["run"].steps["merge_and_push"]
    assert step.status.value == "completed"
    assert "merge_check_passed" not in step.run_metadata, "the gate stops the step before any merge"
    assert not (champion["out"] / challenger["run"].name).exists(), "nothing exported"
    production = Client().get_model_version(MODEL, "production")
    assert champion["run"].name in production.pipeline_runs, "production is unchanged"
    assert mlflow_run(challenger["run"].name).data.tags["llmtune.verdict"] == "rejected"


@pytest.mark.pipeline
def test_a_rejected_runs_summary_says_how_to_export_its_kept_adapter(challenger: dict) -> None:
    from io import StringIO

    from rich.console import Console

    from cli.sources import step_output
    from cli.summary import print_summary

    printed = StringIO()
    print_summary(challenger["run"].id, console=Console(file=printed, width=200))
    command = f"python run.py --pipeline export --set source.run={challenger['run'].name}"
    assert f"Export anyway: {command}" in printed.getvalue()
    adapter = step_output(challenger["run"], "train_sft").load()
    assert Path(adapter.path, "adapter_model.safetensors").is_file(), "the rejected run's adapter is kept"


@pytest.mark.pipeline
def test_evaluate_pipeline_rescores_a_model_version_without_training(
    champion: dict, challenger: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [*champion["overrides"], "source.model_version=production", "evaluation.num_generation_prompts=6"]
    assert cli("evaluate", overrides) == 0
    printed = capsys.readouterr().out
    assert "no production version yet" not in printed, "there is one: the version evaluated"
    assert re.search(r"^It is production version \d+ itself: not compared with production\.$", printed, re.MULTILINE)
    run = latest_run("evaluate")
    assert set(run.steps) == {"evaluate"}, "base, adapter and data come from the finetune run"
    report = eval_report(run)
    assert report["generation_prompts"] == 6, "this invocation's evaluation section applies"
    assert report["tuned_eval_loss"] == pytest.approx(eval_report(champion["run"])["tuned_eval_loss"], abs=1e-4)
    assert "champion_scored_on" not in report, "production is not compared with itself"


@pytest.mark.pipeline
def test_evaluate_pipeline_scores_an_adapter_folder_against_production(
    champion: dict, challenger: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = champion["out"] / champion["run"].name / "adapter"
    assert cli("evaluate", [*champion["overrides"], f"source.adapter={adapter}"]) == 0
    run = latest_run("evaluate")
    assert set(run.steps) == {"prepare_dataset", "load_base_model", "import_adapter", "evaluate"}
    report = eval_report(run)
    # the exported adapter is the champion's: the same score as production re-scored beside it
    assert report["tuned_eval_loss"] == pytest.approx(report["champion_eval_loss"], abs=1e-4)
    assert "Gate preview (nothing promoted): PROMOTE to production" in capsys.readouterr().out


@pytest.mark.pipeline
def test_evaluate_pipeline_refuses_a_folder_that_is_not_an_adapter(
    champion: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    assert cli("evaluate", [*champion["overrides"], f"source.adapter={tmp_path}"]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


@pytest.mark.pipeline
def test_a_run_that_fails_before_training_uses_up_no_model_version_number(
    tiny_model_dir: Path, rows_file: Path, tmp_path: Path
) -> None:
    """The prepare step stops the run (every row too long, data.on_too_many_dropped=raise); its model version is
    deleted, so the next run of the model is version 1, while the failed run stays listed."""
    from zenml.client import Client

    model = "fails-first"
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, tmp_path, max_steps=2),
        f"export.zenml_model={model}",
        "export.formats=[adapter]",
        "export.publish_format=adapter",
    ]
    too_long = ["data.max_seq_length=8", "data.on_too_many_dropped=raise"]
    assert cli("finetune", [*overrides, *too_long]) == 2  # a user-fixable error
    failed = latest_run("finetune")
    assert failed.status.value == "failed" and failed.model_version is None
    assert Client().list_model_versions(model_name_or_id=model).total == 0
    assert cli("finetune", overrides) == 0
    done = latest_run("finetune")
    assert done.status.value == "completed" and done.model_version.number == 1
