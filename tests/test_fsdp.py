"""Fully sharded QLoRA (`training.parallelism: fsdp`) on the CPU tier: config, quant storage, the Trainer's FSDP
arguments, the backend fallback, and one real 2-process FSDP2 run (gloo) of the worker on the tiny 4-bit model.

What runs only on a multi-GPU machine (tests/gpu/test_data_parallel.py, not in CI): NCCL sharding, memory
per GPU, the 70B shape under a per-GPU memory cap, and the pipeline's fsdp run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.config import ConfigError, LoraConfig, ModelConfig, TrainingConfig, load_config
from llmtune.train import distributed
from tests.test_distributed import make_job


def test_fsdp_stores_4bit_weights_in_the_compute_dtype_and_ddp_in_uint8() -> None:
    assert load_config(None, ["training.parallelism=fsdp"]).model.quant_storage == "compute_dtype"
    assert load_config(None).model.quant_storage == "uint8"
    with pytest.raises(ConfigError, match=r"parallelism=fsdp.*model.quant_storage=uint8"):
        load_config(None, ["training.parallelism=fsdp", "model.quant_storage=uint8"])
    with pytest.raises(ConfigError, match=r"fsdp_cpu_offload=true needs training\.parallelism=fsdp"):
        load_config(None, ["training.fsdp_cpu_offload=true"])


def test_fsdp_turns_on_fsdp2_in_the_trainer_with_activation_checkpointing_instead_of_the_trainers() -> None:
    from llmtune.train.sft import sft_config

    args = sft_config(
        TrainingConfig(parallelism="fsdp", gradient_checkpointing=True, fsdp_cpu_offload=True), "/tmp/x", 64
    )
    fsdp_config: dict = args.fsdp_config  # type: ignore[assignment]  # a dict once the arguments are processed
    assert args.fsdp and fsdp_config["version"] == 2 and fsdp_config["cpu_offload"] is True
    assert fsdp_config["activation_checkpointing"] is True and args.gradient_checkpointing is False
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["activation_checkpointing"] is True
    ddp = sft_config(TrainingConfig(gradient_checkpointing=True), "/tmp/x", 64)
    assert not ddp.fsdp and ddp.gradient_checkpointing is True


def test_fsdp_trains_with_hf_and_one_process_trains_unsharded(tmp_path: Path, capsys) -> None:
    job = make_job(tmp_path, tmp_path, tmp_path, TrainingConfig(parallelism="fsdp"))
    job.backend = "unsloth"
    sharded = distributed.for_parallelism(job, processes=2)
    assert sharded.backend == "hf" and sharded.training.parallelism == "fsdp"
    assert "trains with the hf backend" in capsys.readouterr().out
    alone = distributed.for_parallelism(job, processes=1)
    assert alone.training.parallelism == "ddp" and "nothing to shard" in capsys.readouterr().out
    plain = make_job(tmp_path, tmp_path, tmp_path, TrainingConfig())
    assert distributed.for_parallelism(plain, processes=2) == plain


@pytest.fixture(scope="module")
def float_storage_base(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from llmtune.model import hf

    out = tmp_path_factory.mktemp("base-fsdp")
    hf.load_quantized(ModelConfig(name=str(tiny_model_dir), quant_storage="compute_dtype"), out)
    return out


def test_a_compute_dtype_stored_base_gives_the_same_logits_as_uint8(
    float_storage_base: Path, quantized_dir: Path
) -> None:
    import torch

    from llmtune.model import hf

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        logits = [hf.load_base(d)(ids).logits for d in (quantized_dir, float_storage_base)]
    packed = [p for p in hf.load_base(float_storage_base).parameters() if p.__class__.__name__ == "Params4bit"]
    assert packed and all(p.dtype == torch.float32 for p in packed)  # the CPU compute dtype
    assert torch.equal(logits[0], logits[1])


def test_fsdp2_shards_the_4bit_base_and_adapter_on_two_cpu_ranks_and_trains_as_the_whole_model(
    tmp_path: Path, float_storage_base: Path, tiny_model_dir: Path
) -> None:
    """A real gloo run of 2 processes (tests/fsdp_worker.py): FSDP2 shards every weight of the 4-bit model, the
    4-bit base included; the sharded model trains with the whole model's losses and, gathered by
    `full_adapter_state`, ends with its adapter, which rank 0 saves in PEFT format and which passes the merge check.

    The Trainer's own FSDP path cannot run here: accelerate 1.15 turns FSDP on for multi-GPU runs only (a CPU
    launch trains unsharded), so the sharded Trainer run is in tests/gpu/test_data_parallel.py.
    """
    import subprocess
    import sys

    from llmtune.model import hf
    from llmtune.train.distributed import free_port, worker_env

    initial = tmp_path / "adapter0"
    hf.add_lora(float_storage_base, LoraConfig(dropout=0.0), initial)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "tests.fsdp_worker", str(float_storage_base), str(initial), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["dtensor_params"] == rank["params"], "every parameter is sharded"
        assert rank["frozen_4bit_local_rows"] * 2 == rank["frozen_4bit_rows"] > 0, "each rank holds half"
        assert rank["sharded_losses"] == pytest.approx(rank["whole_losses"], rel=1e-4)
        assert rank["whole_losses"][-1] < rank["whole_losses"][0]
        assert rank["gathered_keys_match"] and rank["max_weight_change"] > 1e-3
        assert rank["max_weight_difference"] < 1e-4, "the gathered adapter is the whole model's"
    assert_merge_check_passes(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")


def assert_merge_check_passes(base_16bit: Path, adapter: Path, merged: Path) -> None:
    from transformers import AutoTokenizer

    from llmtune.config import ExportConfig
    from llmtune.release import check, merge

    merge.merge_streaming(base_16bit, adapter, merged, "bfloat16")
    prompts = ["Reverse the word: cat", "Count to three", "Name a color"]
    inputs = check.CheckInputs(base_16bit, adapter, None, AutoTokenizer.from_pretrained(base_16bit), prompts)
    result = check.check_merge(merged, inputs, ExportConfig(merge_check_prompts=3))
    assert result["merge_check_passed"], result["merge_check_failures"]
