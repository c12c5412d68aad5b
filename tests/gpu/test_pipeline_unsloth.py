"""The whole `finetune` pipeline once on the GPU with the unsloth backend, on an isolated ZenML store with MLflow,
on the random-init Llama-3.2-1B shape; read back through the ZenML client and MLflow. It trains on every visible
GPU (`training.num_gpus=0`), so on a machine with several the train step runs data-parallel, and the evaluate
step runs on Unsloth's fast inference path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FINETUNE_STEPS, tiny_run_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.pipeline]


@pytest.fixture(scope="module")
def unsloth_run(llama_1b_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory):
    from zenml.client import Client

    import run as cli

    overrides = [
        *tiny_run_overrides(llama_1b_dir, rows_file, tmp_path_factory.mktemp("outputs"), max_steps=30),
        "model.backend=unsloth",  # later --set wins over the hf of the CPU overrides
        "training.learning_rate=0.001",
        "training.logging_steps=5",
        "training.gradient_checkpointing=true",
        "training.num_gpus=0",  # every visible GPU: on a machine with several, the step trains data-parallel
    ]
    assert cli.main(["--pipeline", "finetune", *(a for o in overrides for a in ("--set", o))]) == 0
    return Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]


def test_six_steps_complete_with_unsloth(unsloth_run) -> None:
    assert {name: step.status.value for name, step in unsloth_run.steps.items()} == dict.fromkeys(
        FINETUNE_STEPS, "completed"
    )
    for name in ("load_base_model", "inject_lora", "train_sft"):
        assert unsloth_run.steps[name].run_metadata["backend"] == "unsloth", name
    assert unsloth_run.steps["train_sft"].run_metadata["peak_gpu_memory_gib"] > 0
    import torch

    assert unsloth_run.steps["train_sft"].run_metadata["data_parallel_processes"] == torch.cuda.device_count()


def test_backend_and_training_are_in_mlflow(unsloth_run) -> None:
    from mlflow.tracking import MlflowClient

    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    run_id = mlflow_run_id(unsloth_run.name)
    assert run_id is not None
    params, metrics = client.get_run(run_id).data.params, client.get_run(run_id).data.metrics
    assert [params[k] for k in ("model.backend_used", "lora.backend_used", "training.backend_used")] == ["unsloth"] * 3
    curve = [m.value for m in client.get_metric_history(run_id, "train_loss")]
    assert len(curve) == 6 and curve[-1] < curve[0], curve
    assert metrics["tuned_eval_loss"] < metrics["base_eval_loss"]
    assert metrics["peak_gpu_memory_gib"] > 0
