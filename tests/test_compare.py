"""`python run.py compare` on real MLflow runs in a temporary SQLite store, and the same runs read back through
the REST API of a real MLflow UI server started on that store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cli import compare, compare_runs
from tests.browser import free_port

T0 = 1_790_000_000_000  # start times in ms, one second apart, so "newest first" has one answer
SHARED = {"lora.r": "16", "data.fingerprint": "df98fa0a2cad179c"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_run(client: MlflowClient, experiment_id: str, name: str, offset_s: int, spec: dict[str, Any]) -> str:
    """One run shaped like a finetune pipeline run: dotted params, a train_loss curve, eval metrics."""
    run = client.create_run(experiment_id, start_time=T0 + offset_s * 1000, run_name=name)
    curve = [Metric("train_loss", loss, T0 + step, step) for step, loss in spec["curve"]]
    metrics = [Metric(key, value, T0, 0) for key, value in spec["metrics"].items()]
    logged = {key: value for key, value in SHARED.items() if key not in spec.get("cached", ())}
    params = [Param(key, value) for key, value in {**logged, **spec["params"]}.items()]
    tags = [RunTag(key, value) for key, value in spec.get("tags", {}).items()]
    client.log_batch(run.info.run_id, metrics=curve + metrics, params=params, tags=tags)
    client.set_terminated(run.info.run_id, spec["status"])
    return str(run.info.run_id)


RUNS = {
    "finetune-old": {
        "params": {"training.learning_rate": "0.001", "training.max_steps": "20"},
        "curve": [(5, 2.6), (10, 2.1), (15, 1.8), (20, 1.7)],
        "metrics": {
            "final_train_loss": 1.7,
            "base_eval_loss": 2.824,
            "tuned_eval_loss": 1.52,
            "base_perplexity": 16.84,
            "tuned_perplexity": 4.57,
            "base_exact_match": 0.1406,
            "tuned_exact_match": 0.25,
            "train_seconds": 31.0,
        },
        "status": "FINISHED",
    },
    "finetune-crashed": {
        "params": {"training.learning_rate": "0.05", "training.max_steps": "20"},
        "curve": [(5, 2.6), (10, 9.5)],
        "metrics": {},
        "status": "FAILED",
    },
    "finetune-new": {
        "params": {"training.learning_rate": "0.003", "training.max_steps": "40"},
        "curve": [(10, 2.2), (20, 1.5), (30, 1.2), (40, 1.1)],
        "metrics": {
            "final_train_loss": 1.1,
            "base_eval_loss": 2.824,
            "tuned_eval_loss": 1.037,
            "base_exact_match": 0.1406,
            "tuned_exact_match": 0.5,
        },
        "tags": {"llmtune.verdict": "promoted"},
        "cached": ["data.fingerprint"],  # prepare_dataset came from the ZenML cache, so it logged no params
        "status": "FINISHED",
    },
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SQLite MLflow store with experiment 'finetune': two finished runs and, between them, a failed one.

    The MLflow UI server for the REST test is started on it here, so that it boots (two interpreters importing
    mlflow) on the other core while the CLI tests run.
    """
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("finetune", artifact_location=(folder / "artifacts").as_uri())
    ids = {name: log_run(client, experiment_id, name, offset, spec) for offset, (name, spec) in enumerate(RUNS.items())}
    port = free_port()
    server = start_mlflow_ui(uri, port, folder)
    try:
        yield {"uri": uri, "ids": ids, "experiment_id": experiment_id, "server": server, "port": port}
    finally:
        stop(server)


def start_mlflow_ui(uri: str, port: int, folder: Path) -> subprocess.Popen[bytes]:
    """The README's `mlflow ui --backend-store-uri ...`, on one worker and without the job runner (which starts
    eight more processes for features these tests do not use)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Its own folder as cwd: the server would put a ./mlartifacts folder there. Its own session: `mlflow ui`
    # starts the web server as a child process, which must go down with it.
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop(server: subprocess.Popen[bytes]) -> None:
    """End the server and its children: the process group it leads, which this test module created."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a rich table printed without colour: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_run_py_compare_shows_the_differing_params_the_metrics_and_writes_the_plot(
    store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import run as cli

    monkeypatch.setenv("COLUMNS", "160")  # rich's width when stdout is not a terminal
    plot = tmp_path / "curves" / "loss.png"
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--plot", str(plot)]) == 0
    stdout = capsys.readouterr().out
    *table_lines, json_line = stdout.strip().splitlines()
    rows = table_rows("\n".join(table_lines))
    # newest first, the failed run left out; only the params that differ (one run lacking a param, as after a
    # cached step, is no difference), constant ones counted
    data = json.loads(json_line)
    assert [run["run_name"] for run in data["runs"]] == ["finetune-new", "finetune-old"]
    assert data["params"] == {"training.learning_rate": ["0.003", "0.001"], "training.max_steps": ["40", "20"]}
    assert data["hidden_params"] == len(SHARED)
    assert rows["training.learning_rate"] == ["0.003", "0.001"]
    assert rows["training.max_steps"] == ["40", "20"]
    assert not set(SHARED) & set(rows)
    assert f"{len(SHARED)} params that do not differ are hidden" in stdout
    # key metrics: final train loss from the curve, eval loss and generation metrics; no perplexity or timing
    assert data["metrics"] == {
        "final_train_loss": [1.1, 1.7],
        "base_eval_loss": [2.824, 2.824],
        "tuned_eval_loss": [1.037, 1.52],
        "base_exact_match": [0.1406, 0.1406],
        "tuned_exact_match": [0.5, 0.25],
    }
    assert rows["tuned_eval_loss"] == ["1.037", "1.52"]
    assert rows["tuned_exact_match"] == ["0.5", "0.25"]
    assert rows["verdict"] == ["promoted", "-"]
    assert "status" not in rows  # all shown runs finished
    assert data["plot"] == str(plot)
    assert_png(plot)


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (800, 450)


def test_include_failed_and_all_params(
    store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--tracking-uri", store["uri"], "--plot", str(tmp_path / "p.png")]
    assert compare_runs.main([*args, "--include-failed", "--all-params", "--last", "2"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out.strip().splitlines()[-1])
    assert [run["status"] for run in data["runs"]] == ["FINISHED", "FAILED"]
    assert data["hidden_params"] == 0
    assert data["params"]["lora.r"] == ["16", "16"]
    assert data["params"]["data.fingerprint"] == [None, SHARED["data.fingerprint"]]
    assert data["metrics"]["final_train_loss"] == [1.1, 9.5]  # the failed run's curve ends where it crashed
    assert data["metrics"]["tuned_eval_loss"] == [1.037, None]
    rows = table_rows(out)
    assert rows["status"] == ["FINISHED", "FAILED"]
    assert rows["tuned_eval_loss"] == ["1.037", "-"]
    assert rows["data.fingerprint"] == ["-", SHARED["data.fingerprint"]]


def test_missing_experiment_or_runs_is_one_line_and_exit_2(
    store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(tracking_uri=store["uri"])
    only_failed = client.create_experiment("only-failed", artifact_location=(tmp_path / "a").as_uri())
    log_run(client, only_failed, "crash", 0, RUNS["finetune-crashed"])
    assert compare_runs.main(["--tracking-uri", store["uri"], "--experiment", "nope"]) == 2
    assert compare_runs.main(["--tracking-uri", store["uri"], "--experiment", "only-failed"]) == 2
    missing, empty = capsys.readouterr().err.strip().splitlines()
    hint = "; run `python run.py --pipeline finetune` first."
    assert missing == f"error: MLflow experiment 'nope' does not exist in {store['uri']}{hint}"
    assert empty.endswith(
        f"'only-failed' in {store['uri']} has no finished runs (--include-failed shows the others){hint}"
    )
    assert not (tmp_path / "p.png").exists()


def test_default_store_is_the_project_stacks_tracker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --tracking-uri the CLI reads the store the pipeline logs to: the local stack's MLflow tracker."""
    monkeypatch.delenv("ZENML_ACTIVE_STACK_ID", raising=False)  # restored afterwards; selecting a stack sets it
    uri = compare_runs.stack_tracking_uri()
    assert uri.startswith("sqlite:///") and uri.endswith("mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = f"compare-{tmp_path.name}"  # this session's pipeline tests may have logged 'finetune' here
    run_id = log_run(client, client.create_experiment(experiment), "stack-run", 0, RUNS["finetune-new"])
    assert compare_runs.main(["--experiment", experiment, "--plot", str(tmp_path / "p.png")]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["tracking_uri"] == uri
    assert [run["run_id"] for run in data["runs"]] == [run_id]
    assert compare_runs.main(["--experiment", "finetune-never-run"]) == 2


def get_json(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.loads(response.read()))


def wait_until_up(server: subprocess.Popen[bytes], base: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow ui did not answer at {base} within {timeout_s} s")


def test_mlflow_ui_serves_the_same_runs_over_rest(store: dict[str, Any]) -> None:
    """The MLflow UI on the store answers, and its REST API returns the runs, params and curves compare read."""
    base = f"http://127.0.0.1:{store['port']}"
    wait_until_up(store["server"], base)
    api = f"{base}/api/2.0/mlflow"
    experiment = get_json(f"{api}/experiments/get-by-name?experiment_name=finetune")["experiment"]
    assert experiment["experiment_id"] == store["experiment_id"]
    search = {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": "attributes.status = 'FINISHED'",
        "order_by": ["attributes.start_time DESC"],
    }
    found = get_json(f"{api}/runs/search", search)["runs"]
    expected = compare.fetch_runs(store["uri"], "finetune")
    assert [run["info"]["run_id"] for run in found] == [run.run_id for run in expected]
    assert [run.run_id for run in expected] == [store["ids"]["finetune-new"], store["ids"]["finetune-old"]]
    for rest, read in zip(found, expected, strict=True):
        assert {p["key"]: p["value"] for p in rest["data"]["params"]} == read.params
        assert {m["key"]: m["value"] for m in rest["data"]["metrics"]} == read.metrics
        query = urllib.parse.urlencode({"run_id": read.run_id, "metric_key": "train_loss"})
        history = get_json(f"{api}/metrics/get-history?{query}")["metrics"]
        assert sorted((int(m["step"]), m["value"]) for m in history) == read.loss_curve
