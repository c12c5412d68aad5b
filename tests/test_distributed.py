"""Data-parallel training (`training.num_gpus`): how many processes, the launch command, errors coming back, and
one real 2-process run of the worker on the CPU (gloo) on the tiny model, with its gradients all-reduced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmtune.artifacts import TrainingReport
from llmtune.config import LoraConfig, TrainingConfig
from llmtune.train import distributed

RANKS_ENV = "LLMTUNE_TEST_RANKS_DIR"


def test_num_gpus_zero_means_every_visible_gpu_or_this_process() -> None:
    assert distributed.processes_for(0, visible=2) == 2
    assert distributed.processes_for(0, visible=0) == 1
    assert distributed.processes_for(1, visible=0) == 1
    assert distributed.processes_for(2, visible=8) == 2


def test_more_gpus_than_visible_is_refused_with_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(distributed.DataParallelError) as caught:
        distributed.processes_for(4, visible=2)
    message = str(caught.value)
    assert "training.num_gpus=4" in message and "2 CUDA GPUs are visible" in message
    assert "CUDA_VISIBLE_DEVICES=0,1" in message and "training.num_gpus=2" in message
    with pytest.raises(distributed.DataParallelError, match=r"none is visible.*training\.num_gpus=1"):
        distributed.processes_for(2, visible=0)


def test_launch_command_is_what_accelerate_launch_parses_as_our_worker(tmp_path: Path) -> None:
    from accelerate.commands.launch import launch_command_parser

    cmd = distributed.launch_command(3, tmp_path / "job.json", port=29555, python="/usr/bin/python3")
    assert cmd[:3] == ["/usr/bin/python3", "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.multi_gpu and args.num_processes == 3 and args.num_machines == 1
    assert args.main_process_port == 29555 and args.module
    assert args.training_script == "llmtune.train.distributed"
    assert args.training_script_args == [str(tmp_path / "job.json")]


def test_job_round_trips_through_its_file(tmp_path: Path) -> None:
    job = make_job(tmp_path, "a", "b", TrainingConfig(max_steps=3), callbacks=["m:f"])
    assert distributed.TrainJob.read(job.write(tmp_path / "job.json")) == job


def test_a_rank_that_fails_leaves_its_error_for_the_launcher(
    tmp_path: Path, quantized_dir: Path, prepared_dir: Path
) -> None:
    from llmtune.train.sft import TrainingError

    missing = tmp_path / "no-such-adapter"
    job = make_job(tmp_path, prepared_dir, missing, TrainingConfig(max_steps=1), base_dir=quantized_dir)
    job_file = job.write(tmp_path / "job.json")
    with pytest.raises(Exception, match="no-such-adapter"):
        distributed.main([str(job_file)])
    error = distributed.launch_failure(tmp_path, code=1, tail=[], processes=2)
    assert isinstance(error, TrainingError)
    assert "on 2 GPUs failed on rank 0" in str(error) and "no-such-adapter" in str(error)


def test_out_of_memory_on_any_rank_comes_back_as_gpu_out_of_memory(tmp_path: Path) -> None:
    from llmtune.train.memory import GpuOutOfMemory

    (tmp_path / "error-rank-0.json").write_text(json.dumps(error_record(0, "NCCL: peer exited", oom=False)))
    advice = "The GPU ran out of memory during training. Lower one of these and run again: ..."
    (tmp_path / "error-rank-1.json").write_text(json.dumps(error_record(1, advice, oom=True)))
    error = distributed.launch_failure(tmp_path, code=1, tail=[], processes=2)
    assert isinstance(error, GpuOutOfMemory) and str(error) == advice


def test_a_launch_that_dies_without_a_record_reports_its_last_output(tmp_path: Path) -> None:
    error = distributed.launch_failure(tmp_path, code=-9, tail=["loading", "Killed"], processes=2)
    assert "exited with code -9" in str(error) and str(error).endswith("loading\nKilled")


def test_the_steps_loss_logger_writes_the_curve_to_the_active_mlflow_run(tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from steps.tracking import metric_logger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    log = metric_logger("train_loss")
    try:
        log(9.0, 1)  # no active run: nothing happens
        # an explicit experiment: an active experiment id left by an earlier test belongs to another store
        experiment = MlflowClient(tracking_uri=uri).create_experiment("loss-logger")
        with mlflow.start_run(experiment_id=experiment) as run:
            log(3.0, 2)
            log(2.5, 4)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default store
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(2, 3.0), (4, 2.5)]


@pytest.fixture(scope="module")
def initial_adapter(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path) -> Path:
    from llmtune.model import hf

    out = tmp_path_factory.mktemp("adapter0")
    hf.add_lora(quantized_dir, LoraConfig(dropout=0.0), out)
    return out


STEPS, BATCH = 4, 4


@pytest.fixture(scope="module")
def in_process(
    tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path, prepared_dir: Path, initial_adapter: Path
):
    work = tmp_path_factory.mktemp("in-process")
    job = make_job(work, prepared_dir, initial_adapter, tiny_training(), base_dir=quantized_dir)
    return {"report": distributed.train_adapter(job, processes=1), "out": work / "out", "job": job}


def test_in_process_training_writes_the_adapter_and_report(in_process: dict) -> None:
    report = in_process["report"]
    assert report.data_parallel_processes == 1 and report.backend == "hf"
    # the adapter folder holds the adapter alone; the report travels beside it, as its own artifact
    names = {p.name for p in in_process["out"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and not any("report" in n for n in names)
    assert TrainingReport.model_validate_json(in_process["job"].report_file.read_text()).steps == STEPS


def test_two_processes_train_one_adapter_on_twice_the_rows(
    tmp_path: Path,
    quantized_dir: Path,
    prepared_dir: Path,
    initial_adapter: Path,
    in_process: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `accelerate launch` of 2 worker processes on the CPU: each trains on its own rows of every step,
    DDP all-reduces the LoRA gradients (so both end with the same weights), rank 0 saves."""
    from safetensors.torch import load_file

    monkeypatch.setenv(RANKS_ENV, str(tmp_path / "ranks"))
    (tmp_path / "ranks").mkdir()
    job = make_job(tmp_path, prepared_dir, initial_adapter, tiny_training(), base_dir=quantized_dir)
    job.callbacks = [f"{__name__}:rank_recorder"]
    curve: list[tuple[float, int]] = []
    report = distributed.train_adapter(job, processes=2, on_loss=lambda loss, step: curve.append((loss, step)))

    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["lora_sum"] == ranks[1]["lora_sum"], "gradients were all-reduced: both ranks hold one adapter"
    rows = report.train_rows
    assert ranks[0]["epoch"] == pytest.approx(STEPS * 2 * BATCH / rows), "each step took BATCH rows per process"
    assert report.data_parallel_processes == 2 and len(report.loss_history) == STEPS
    assert curve == [(p["loss"], p["step"]) for p in report.loss_history], "rank 0's curve reached the caller"
    # The loss is the token mean over both processes' rows, on the scale of one process's (not divided by 2).
    ratio = mean_loss(report) / mean_loss(in_process["report"])
    assert 0.75 < ratio < 1.33, ratio

    trained, initial = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "out", initial_adapter))
    assert trained.keys() == initial.keys()
    assert any(not (trained[k] == initial[k]).all() for k in trained if "lora_B" in k)


def mean_loss(report: TrainingReport) -> float:
    return sum(p["loss"] for p in report.loss_history) / len(report.loss_history)


def rank_recorder():
    """A TrainerCallback that each worker makes from its job's `callbacks`: it writes what its rank saw."""
    from transformers import TrainerCallback

    class RankRecorder(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            rank = int(os.environ["RANK"])
            lora = [p for n, p in model.named_parameters() if "lora_" in n]
            record = {
                "rank": rank,
                "world_size": args.world_size,
                "epoch": state.epoch,
                "lora_sum": sum(float(p.detach().double().sum()) for p in lora),
                "device": str(lora[0].device),
            }
            (Path(os.environ[RANKS_ENV]) / f"rank-{rank}.json").write_text(json.dumps(record))

    return RankRecorder()


def tiny_training() -> TrainingConfig:
    # packing off: the checks count example rows per step and process
    return TrainingConfig(
        max_steps=STEPS, per_device_train_batch_size=BATCH, logging_steps=1, save_steps=0, learning_rate=3e-3,
        packing=False,
    )  # fmt: skip


def make_job(
    tmp_path: Path,
    prepared: Path | str,
    adapter: Path | str,
    cfg: TrainingConfig,
    base_dir: Path | str = "base",
    callbacks: list[str] | None = None,
) -> distributed.TrainJob:
    return distributed.TrainJob(
        backend="hf",
        base_dir=str(base_dir),
        adapter_dir=str(adapter),
        train_dir=str(Path(prepared) / "train"),
        tokenizer_dir=str(Path(prepared) / "tokenizer"),
        training=cfg,
        max_seq_length=128,
        out_dir=str(tmp_path / "out"),
        callbacks=callbacks or [],
    )


def error_record(rank: int, message: str, oom: bool) -> dict:
    return {"rank": rank, "out_of_memory": oom, "message": message, "traceback": ""}
