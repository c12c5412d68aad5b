"""Training on 2 GPUs (`training.num_gpus=2`) on the Llama-3.2-1B shape: data-parallel for both backends (one
process per GPU, gradients all-reduced, the loss falls, rank 0 saves a loadable adapter), and sharded (fsdp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.config import LoraConfig, ModelConfig, TrainingConfig
from llmtune.model import resolve_backend
from llmtune.train import distributed
from tests.gpu.test_unsloth_backend import SEQ, successor_task
from tests.test_distributed import RANKS_ENV

pytestmark = pytest.mark.gpu

STEPS, BATCH = 30, 4


@pytest.fixture(autouse=True)
def _needs_two_gpus() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def inputs(llama_1b_dir: Path, demo_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 4-bit base, an initial adapter, the task rows and the tokenizer, as the upstream steps leave them."""
    work = tmp_path_factory.mktemp("data-parallel")
    backend = resolve_backend("hf")
    backend.load_quantized(ModelConfig(name=str(llama_1b_dir), backend="hf"), work / "base")
    backend.add_lora(work / "base", LoraConfig(r=16, alpha=32, dropout=0.0), work / "adapter0")
    successor_task(STEPS * BATCH * 2, SEQ).save_to_disk(str(work / "train"))
    demo_tokenizer.save_pretrained(str(work / "tokenizer"))
    return {"work": work}


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_two_gpus_train_one_adapter(
    backend: str, inputs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    work = inputs["work"]
    monkeypatch.setenv(RANKS_ENV, str(tmp_path))
    cfg = TrainingConfig(
        max_steps=STEPS,
        learning_rate=2e-3,
        per_device_train_batch_size=BATCH,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        gradient_checkpointing=True,
        num_gpus=2,
    )
    job = distributed.TrainJob(
        backend=backend,
        base_dir=str(work / "base"),
        adapter_dir=str(work / "adapter0"),
        train_dir=str(work / "train"),
        tokenizer_dir=str(work / "tokenizer"),
        training=cfg,
        max_seq_length=SEQ,
        out_dir=str(tmp_path / "out"),
        callbacks=["tests.test_distributed:rank_recorder"],
    )
    report = distributed.train_adapter(job, distributed.processes_for(cfg.num_gpus, distributed.visible_gpus()))

    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert [(r["rank"], r["device"]) for r in ranks] == [(0, "cuda:0"), (1, "cuda:1")]
    assert ranks[0]["lora_sum"] == ranks[1]["lora_sum"], "both GPUs hold the same adapter after every step"
    assert report.data_parallel_processes == 2 and report.backend == backend
    assert report.peak_gpu_memory_gib > 0
    losses = [p["loss"] for p in report.loss_history]
    assert len(losses) == STEPS and sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    initial = load_file(str(work / "adapter0" / "adapter_model.safetensors"))
    assert saved.keys() == initial.keys()
    assert any(not (saved[k] == initial[k]).all() for k in saved if "lora_B" in k)


def test_more_gpus_than_there_are_is_refused() -> None:
    import torch

    visible = torch.cuda.device_count()
    with pytest.raises(distributed.DataParallelError, match=f"{visible} CUDA GPUs are visible"):
        distributed.processes_for(visible + 1, visible)


def test_two_gpus_train_one_sharded_adapter_with_fsdp(
    llama_1b_dir: Path, inputs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`training.parallelism=fsdp` through the Trainer on 2 GPUs: every weight (the 4-bit base stored in bf16
    included) is a DTensor holding half the rows on each GPU, the loss falls, rank 0 saves a whole adapter.

    Not run yet: written while no 2-GPU machine was lent (see README "Models larger than one GPU").
    """
    from safetensors.torch import load_file

    from tests.test_fsdp import assert_merge_check_passes

    work = inputs["work"]
    base = tmp_path / "base-bf16-storage"
    resolve_backend("hf").load_quantized(
        ModelConfig(name=str(llama_1b_dir), backend="hf", quant_storage="compute_dtype"), base
    )
    monkeypatch.setenv(RANKS_ENV, str(tmp_path))
    cfg = TrainingConfig(
        max_steps=STEPS, learning_rate=2e-3, per_device_train_batch_size=BATCH, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1, gradient_checkpointing=True, num_gpus=2, parallelism="fsdp",
    )  # fmt: skip
    job = distributed.TrainJob(
        backend="unsloth",  # falls back to hf under fsdp
        base_dir=str(base),
        adapter_dir=str(work / "adapter0"),
        train_dir=str(work / "train"),
        tokenizer_dir=str(work / "tokenizer"),
        training=cfg,
        max_seq_length=SEQ,
        out_dir=str(tmp_path / "out"),
        callbacks=["tests.gpu.test_data_parallel:shard_recorder"],
    )
    report = distributed.train_adapter(job, processes=2)

    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("shards-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["dtensor_params"] == rank["params"] and rank["local_rows"] * 2 == rank["rows"]
    assert report.backend == "hf" and report.data_parallel_processes == 2
    losses = [p["loss"] for p in report.loss_history]
    assert len(losses) == STEPS and sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    initial = load_file(str(work / "adapter0" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in initial.items()}
    assert_merge_check_passes(llama_1b_dir, tmp_path / "out", tmp_path / "merged")


def shard_recorder():
    """A TrainerCallback each worker makes from its job: how FSDP left its parameters (DTensor shards)."""
    import os

    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    class ShardRecorder(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.dim() == 2]
            sharded = [p for p in params if isinstance(p, DTensor)]
            record = {
                "rank": int(os.environ["RANK"]),
                "params": len(params),
                "dtensor_params": len(sharded),
                "local_rows": sum(p.to_local().shape[0] for p in sharded),
                "rows": sum(p.shape[0] for p in sharded),
            }
            (Path(os.environ[RANKS_ENV]) / f"shards-{record['rank']}.json").write_text(json.dumps(record))

    return ShardRecorder()
