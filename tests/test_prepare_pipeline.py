"""`python run.py --pipeline prepare`: one step, a printed report, a dashboard visualization, MLflow stats."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline


def test_prepare_pipeline_prints_report_and_logs_it(
    tiny_model_dir: Path, rows_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient
    from zenml.client import Client
    from zenml.enums import VisualizationType

    import run as cli
    from cli.stack import mlflow_tracking_uri
    from llmtune.artifacts import PreparedData

    args = ["--pipeline", "prepare", "--set", f"data.source={rows_file}", "--set", f"model.name={tiny_model_dir}"]
    assert cli.main([*args, "--no-cache"]) == 0  # other tests may have prepared the same data already
    out = capsys.readouterr().out
    expected = ("rows in", "rows kept", "token length", "Token lengths:", "tokens carrying loss are between [[ and ]]")
    assert all(line in out for line in expected)

    run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
    assert run.pipeline is not None and run.pipeline.name == "prepare" and list(run.steps) == ["prepare_dataset"]
    artifact = run.steps["prepare_dataset"].outputs["prepared_data"][0]
    [visualization] = artifact.visualizations or []
    assert visualization.type == VisualizationType.HTML and visualization.uri.endswith("report.html")
    assert "<svg" in Path(visualization.uri).read_text()

    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    experiment = client.get_experiment_by_name("prepare")
    assert experiment is not None
    [mlflow_run] = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{run.name}'")
    stats = PreparedData(str(artifact.load().path)).stats()
    assert mlflow_run.data.params["data.fingerprint"] == stats["fingerprint"]
    assert mlflow_run.data.metrics["data_rows_in"] == 240
    logged = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "data")}
    assert {"data/report.html", "data/token_lengths.png", "data/stats.json"} <= logged

    assert cli.main(args) == 0, "a cached run prints the same report from the stored artifact"
    again = capsys.readouterr().out
    assert "rows kept" in again and "step status: cached" in again


def test_an_edited_chat_template_prepares_the_data_again(
    tiny_model_dir: Path, rows_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The prepare step's cache key has the tokenizer's rendered template: editing chat_template.jinja at the same
    path is not a cache hit, an unchanged one is."""
    import shutil

    import run as cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["--pipeline", "prepare", "--set", f"data.source={rows_file}", "--set", f"model.name={model}"]
    statuses = []
    for edit in (False, False, True):
        if edit:  # a colon after every role in the headers and the generation prompt
            template = model / "chat_template.jinja"
            text = template.read_text().replace("message['role']", "message['role'] + ':'")
            template.write_text(text.replace("<|im_start|>assistant", "<|im_start|>assistant:"))
        assert cli.main(args) == 0
        statuses.append(capsys.readouterr().out.split("step status: ")[1].split(")")[0])
    assert statuses[1:] == ["cached", "completed"]
