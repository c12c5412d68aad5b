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
    for expected in ("rows in", "rows kept", "token length", "Token lengths:", "Example (tokens on green carry loss)"):
        assert expected in out

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
