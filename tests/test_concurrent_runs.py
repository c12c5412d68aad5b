"""Two pipeline runs started at once on the local stack of a fresh ZenML store both finish, each with its own
artifacts and its own MLflow run.

Both processes find no `llmtune-local` stack and race to create it; both write to the same SQLite store and
the same MLflow database. They run with --no-cache so that neither reuses a step result of the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FINETUNE_STEPS, tiny_run_overrides

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[1]


def start_run(overrides: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    args = [sys.executable, "run.py", "--pipeline", "finetune", "--no-cache"]
    args += [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point this process's ZenML client at a new, empty store for this module; restore the session's after."""
    from zenml.client import Client
    from zenml.config.global_config import GlobalConfiguration

    session_store = os.environ["ZENML_CONFIG_PATH"]
    session_stack = os.environ.pop("ZENML_ACTIVE_STACK_ID", None)
    fresh = str(tmp_path_factory.mktemp("zenml-concurrent"))
    os.environ["ZENML_CONFIG_PATH"] = fresh
    GlobalConfiguration._reset_instance()
    Client._reset_instance()
    yield fresh
    os.environ["ZENML_CONFIG_PATH"] = session_store
    os.environ.pop("ZENML_ACTIVE_STACK_ID", None)
    if session_stack:
        os.environ["ZENML_ACTIVE_STACK_ID"] = session_stack
    GlobalConfiguration._reset_instance()
    Client._reset_instance()


@pytest.fixture(scope="module")
def two_runs(fresh_store: str, tiny_model_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory):
    from zenml.client import Client

    overrides = tiny_run_overrides(tiny_model_dir, rows_file, tmp_path_factory.mktemp("out"), max_steps=4)
    env = {k: v for k, v in os.environ.items() if k != "ZENML_ACTIVE_STACK_ID"}
    processes = [start_run(overrides, env), start_run(overrides, env)]  # started together, not one after another
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return Client().list_pipeline_runs(sort_by="desc:created", size=10, hydrate=True).items


def test_both_runs_complete_all_six_steps(two_runs: list) -> None:
    assert len(two_runs) == 2
    for run in two_runs:
        assert run.status.value == "completed"
        assert {name: step.status.value for name, step in run.steps.items()} == dict.fromkeys(
            FINETUNE_STEPS, "completed"
        )
    assert two_runs[0].name != two_runs[1].name


def test_each_run_has_its_own_artifacts(two_runs: list) -> None:
    first, second = ({a.id: a.uri for s in run.steps.values() for a in outputs(s)} for run in two_runs)
    assert len(first) == len(second) == 9  # seven steps; train_sft and merge_and_push have two outputs each
    assert not set(first) & set(second), "no artifact version shared"
    assert not set(first.values()) & set(second.values()), "no artifact folder shared"


def outputs(step) -> list:
    return [a for versions in step.outputs.values() for a in (versions if isinstance(versions, list) else [versions])]


def test_each_run_has_its_own_complete_mlflow_run(two_runs: list) -> None:
    from mlflow.tracking import MlflowClient

    from cli.stack import mlflow_tracking_uri, use_local_stack
    from cli.summary import mlflow_run_id

    use_local_stack()
    ids = [mlflow_run_id(run.name) for run in two_runs]
    assert all(ids) and ids[0] != ids[1]
    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    for run_id in filter(None, ids):
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2, 4]
        assert {"adapter", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
