"""The whole `finetune` pipeline on an isolated ZenML store (see conftest), read back from ZenML and MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FINETUNE_STEPS, tiny_run_overrides

pytestmark = pytest.mark.pipeline


def run(overrides: list[str], *flags: str) -> int:
    import run as cli

    return cli.main(["--pipeline", "finetune", *flags, *(a for o in overrides for a in ("--set", o))])


def last_run():
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]


def statuses(pipeline_run) -> dict[str, str]:
    return {name: step.status.value for name, step in pipeline_run.steps.items()}


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("outputs")
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, out),
        "export.formats=[adapter,merged_16bit,gguf]",
        "training.eval_steps=4",
    ]
    assert run(overrides, "--no-cache") == 0  # other test modules may have run this config already
    return {"run": last_run(), "overrides": overrides, "out": out}


def test_six_steps_complete_in_one_pipeline(first_run: dict) -> None:
    pipeline_run = first_run["run"]
    assert pipeline_run.pipeline.name == "finetune"
    assert statuses(pipeline_run) == dict.fromkeys(FINETUNE_STEPS, "completed")


def test_metrics_params_and_artifacts_are_in_mlflow(first_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    run_id = mlflow_run_id(first_run["run"].name)
    assert run_id, "one MLflow run named after the ZenML run"
    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    mlflow_run = client.get_run(run_id)
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "finetune"
    curve = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in curve] == [2, 4, 6, 8]
    for name in ("learning_rate", "grad_norm"):  # per logging step, like the loss
        assert [m.step for m in client.get_metric_history(run_id, name)] == [2, 4, 6, 8], name
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [4, 8], "training.eval_steps=4"
    assert (metrics := mlflow_run.data.metrics)["train_steps"] == 8 and metrics["train_epochs"] > 0
    metrics = mlflow_run.data.metrics
    assert metrics["tuned_eval_loss"] < metrics["base_eval_loss"]
    assert {"base_exact_match", "tuned_exact_match", "merge_check_max_logit_gap"} <= set(metrics)
    assert mlflow_run.data.params["training.max_steps"] == "8"
    assert mlflow_run.data.params["model.backend_used"] == "hf"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "config.yaml"} <= artifacts
    assert "adapter_model.safetensors" in {Path(a.path).name for a in client.list_artifacts(run_id, "adapter")}


def test_local_export_has_adapter_config_and_loadable_merged_model(first_run: dict) -> None:
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    dest = first_run["out"] / first_run["run"].name
    assert "training:" in (dest / "adapter" / "llmtune_config.yaml").read_text()
    assert PeftConfig.from_pretrained(dest / "adapter").r == 16
    AutoModelForCausalLM.from_pretrained(dest / "merged")


def test_gguf_export_is_checked_recorded_and_logged_to_mlflow_by_path(first_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    from cli.sources import step_output
    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    pipeline_run = first_run["run"]
    report = step_output(pipeline_run, "merge_and_push", "export_report").load()
    assert report["gguf_check_passed"] and report["gguf_q8_0_max_logit_gap"] <= report["gguf_q8_0_atol"]
    metadata = pipeline_run.steps["merge_and_push"].run_metadata
    assert metadata["gguf_check_passed"] is True and "gguf_q8_0_greedy_mismatches" in metadata
    local = Path(report["gguf_path"])
    assert {"model-q8_0.gguf", "Modelfile", "README.md"} <= {p.name for p in local.iterdir()}
    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    run_id = mlflow_run_id(pipeline_run.name)
    assert run_id is not None
    assert "gguf_q8_0_max_logit_gap" in client.get_run(run_id).data.metrics
    logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "gguf")}
    assert logged["model-q8_0.gguf"] == (local / "model-q8_0.gguf").stat().st_size and "Modelfile" in logged


def chat_question(pipeline_run, demo_rows: list) -> tuple[str, str]:
    """A held-out demo question as a user types it, and the prompt training rendered for it."""
    from cli.sources import step_output
    from tests.test_chat import held_out_question

    prepared = step_output(pipeline_run, "prepare_dataset").load()
    return held_out_question(demo_rows, prepared.tokenizer(), prepared)


def test_chat_one_shot_gives_the_tuned_answer_and_base_with_the_adapter_off(
    first_run: dict, demo_rows: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """The newest run (the default), --run with --base, and the exported --adapter folder, each against the
    answers evaluation's own generation gives on the run's model for the training-rendered prompt."""
    from cli.sources import step_output
    from llmtune.evaluate.scoring import generate_answers
    from llmtune.model import hf

    pipeline_run = first_run["run"]
    text, prompt = chat_question(pipeline_run, demo_rows)
    base, adapter = step_output(pipeline_run, "load_base_model").load(), step_output(pipeline_run, "train_sft").load()
    model = hf.load_for_inference(base.path, adapter.path)
    tokenizer = step_output(pipeline_run, "prepare_dataset").load().tokenizer()
    [tuned] = generate_answers(model, tokenizer, [prompt], 10, batch_size=1)
    with model.disable_adapter():
        [base_answer] = generate_answers(model, tokenizer, [prompt], 10, batch_size=1)
    one_shot = ["--prompt", text, "--max-new-tokens", "10"]
    answers = {}
    for name, options in {
        "default": [],
        "base": ["--run", pipeline_run.name, "--base"],
        "adapter": ["--adapter", str(first_run["out"] / pipeline_run.name / "adapter")],
    }.items():
        assert run_cli(["chat", *options, *one_shot]) == 0
        answers[name] = capsys.readouterr().out.strip()
    assert answers == {"default": tuned, "base": base_answer, "adapter": tuned}
    assert run_cli(["chat", "--run", "no-such-run", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "source.run 'no-such-run' is not a pipeline run" in err and "For run.py chat: --run NAME" in err


def run_cli(argv: list[str]) -> int:
    import run as cli

    return cli.main(argv)


def test_changing_a_training_value_reuses_cached_upstream_steps(first_run: dict) -> None:
    assert run([*first_run["overrides"], "training.max_steps=6"]) == 0
    got = statuses(last_run())
    assert [got[s] for s in ("prepare_dataset", "load_base_model", "inject_lora")] == ["cached"] * 3
    assert got["train_sft"] == "completed"
    # the cached steps logged nothing to this run, yet its MLflow params still cover every config section
    from mlflow.tracking import MlflowClient

    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    run_id = mlflow_run_id(last_run().name)
    assert run_id is not None
    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    rerun = client.get_run(run_id).data
    params = rerun.params
    assert params["training.max_steps"] == "6" and params["lora.r"] == "16"
    assert params["data.source"] == first_run["overrides"][1].split("=", 1)[1]
    # what the cached steps logged when they ran is logged again: compare shows only the real differences
    original = client.get_run(mlflow_run_id(first_run["run"].name)).data  # type: ignore[arg-type]
    assert original.params["data.format"] != "auto", "the prepare step logs the detected format"
    for key in ("data.format", "data.fingerprint", "model.backend_used", "lora.backend_used"):
        assert params.get(key) == original.params.get(key), key
    cached_metrics = [k for k in original.metrics if k.startswith("data_")] + ["trainable_params"]
    assert len(cached_metrics) > 2
    for key in cached_metrics:
        assert rerun.metrics.get(key) == original.metrics[key], key
    differing = {k for k in set(params) | set(original.params) if params.get(k) != original.params.get(k)}
    assert differing == {"training.max_steps"}, differing
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on runs"


def test_failed_run_leaves_cached_artifacts_usable(first_run: dict) -> None:
    # a real optimizer (so preflight lets it through) whose package is not installed: train_sft fails
    assert run([*first_run["overrides"], "training.optim=galore_adamw"]) == 1
    failed = last_run()
    assert failed.status.value == "failed" and statuses(failed)["train_sft"] == "failed"
    assert run([*first_run["overrides"], "training.max_steps=4"]) == 0
    got = statuses(last_run())
    assert [got[s] for s in ("prepare_dataset", "load_base_model", "inject_lora")] == ["cached"] * 3
    assert got["merge_and_push"] == "completed"


def test_every_artifact_is_named_for_what_it_is(first_run: dict) -> None:
    """The dashboard labels each artifact node with these names (not 'output')."""
    names = {step: set(first_run["run"].steps[step].outputs) for step in FINETUNE_STEPS}
    assert names == {
        "prepare_dataset": {"prepared_data"},
        "load_base_model": {"quantized_base"},
        "inject_lora": {"initial_adapter"},
        "train_sft": {"trained_adapter", "training_report"},
        "evaluate": {"eval_report"},
        "promotion_gate": {"verdict"},
        "merge_and_push": {"export_report", "merged_model"},
    }


def test_summary_says_how_to_list_model_versions_and_stages(first_run: dict) -> None:
    import io

    from rich.console import Console

    from cli.summary import print_summary

    out = io.StringIO()
    print_summary(first_run["run"].id, console=Console(file=out, width=200))
    version = first_run["run"].model_version
    assert f"model:        {version.model.name} version {version.number}; all versions and stages: " in out.getvalue()
    assert f"zenml model version list --model={version.model.name}" in out.getvalue()


def test_summary_links_the_mlflow_runs_view_that_the_run_saved(first_run: dict) -> None:
    import io
    import json

    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from cli.stack import mlflow_tracking_uri
    from cli.summary import print_summary
    from steps.tracking import RUNS_VIEW_TAG, runs_view_columns

    out = io.StringIO()
    print_summary(first_run["run"].id, console=Console(file=out, width=250))
    experiment = MlflowClient(tracking_uri=mlflow_tracking_uri()).get_experiment_by_name("finetune")
    assert experiment is not None
    link = f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=llmtune"
    assert f"then open:    http://127.0.0.1:5000/{link}" in out.getvalue()
    view = json.loads(experiment.tags[RUNS_VIEW_TAG])
    assert view["selectedColumns"] == runs_view_columns("eval_loss")  # the tiny runs' gate metric
