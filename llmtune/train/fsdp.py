"""Fully sharded QLoRA (`training.parallelism: fsdp`): what the Trainer and the launch need for it.

With ddp every process holds the whole 4-bit model; with fsdp each of the `training.num_gpus` processes
holds 1/N of the 4-bit base and of the adapter between uses (FSDP2 `fully_shard`, one unit per decoder layer
as the model's `_no_split_modules` name them), gathering a layer's weights for its forward and backward
passes. The launch is the data-parallel one (`llmtune.train.distributed`); the Trainer turns FSDP on from
`trainer_arguments`, and accelerate shards the model when the Trainer prepares it.

FSDP shards floating-point parameters only, so the base must have been quantized with its packed 4-bit
weights stored in the compute dtype (`model.quant_storage: compute_dtype`, what `auto` picks for fsdp; the
config refuses uint8 with fsdp). Gradient checkpointing becomes FSDP's activation checkpointing (the
Trainer's own would all-gather every layer a second time in the backward pass).

Not available with 4-bit weights on this stack: loading on rank 0 only. transformers 5.17 loads a quantized
checkpoint on every rank (its meta-device path is for unquantized models) and accelerate 1.15's FSDP2 path
skips the rank-0 broadcast when the model has 4-bit parameters, so each rank reads the 4-bit checkpoint (a
quarter of a 16-bit copy) before it is sharded.

Example:
    >>> from llmtune.config import TrainingConfig
    >>> trainer_arguments(TrainingConfig())
    {}
    >>> args = trainer_arguments(TrainingConfig(parallelism="fsdp", gradient_checkpointing=True))
    >>> args["fsdp"], args["fsdp_config"]["activation_checkpointing"], trainer_checkpointing(TrainingConfig(
    ...     parallelism="fsdp", gradient_checkpointing=True))
    (True, True, False)
    >>> training_backend("unsloth", TrainingConfig(parallelism="fsdp"))[0]
    'hf'
"""

from __future__ import annotations

from typing import Any

from llmtune.config import TrainingConfig


def enabled(cfg: TrainingConfig) -> bool:
    return cfg.parallelism == "fsdp"


def trainer_arguments(cfg: TrainingConfig) -> dict[str, Any]:
    """TrainingArguments fields that turn FSDP2 on for a training section (none for ddp)."""
    if not enabled(cfg):
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,  # full sharding: a layer's weights are freed again after its forward
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer (_no_split_modules)
            "cpu_offload": cfg.fsdp_cpu_offload,
            "activation_checkpointing": cfg.gradient_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",  # checkpoints hold whole tensors, resumable at any rank count
        },
    }


def trainer_checkpointing(cfg: TrainingConfig) -> bool:
    """Whether the Trainer (or PEFT's k-bit preparation) checkpoints activations: under fsdp, FSDP does."""
    return cfg.gradient_checkpointing and not enabled(cfg)


def full_adapter_state(model: Any) -> dict[str, Any]:
    """The trainable (adapter) tensors whole, on the CPU: FSDP's shards gathered (every rank must call this).

    Only the adapter is gathered, not the 4-bit base: a 70B base would not fit rank 0's memory whole.
    """
    from torch.distributed.tensor import DTensor

    return {
        name: (param.full_tensor() if isinstance(param, DTensor) else param).detach().cpu()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def training_backend(backend: str, cfg: TrainingConfig) -> tuple[str, str | None]:
    """The backend that trains under `cfg`, and why it differs from `backend` (None when it does not).

    Unsloth 2026.10 patches the model for one device (its fused LoRA kernels read whole 4-bit weights), so
    a sharded run trains through transformers + PEFT; the adapter format is the same either way.
    """
    if enabled(cfg) and backend == "unsloth":
        return "hf", (
            "training.parallelism=fsdp: the unsloth backend trains one whole model per GPU, so this sharded "
            "run trains with the hf backend (transformers + bitsandbytes + PEFT); the adapter is the same format"
        )
    return backend, None


def single_process_note(cfg: TrainingConfig, processes: int) -> str | None:
    """What to tell a user who asked for fsdp where only one process trains (nothing to shard)."""
    if enabled(cfg) and processes <= 1:
        return (
            "training.parallelism=fsdp with one training process: there is nothing to shard across, so this run "
            "trains the whole model in the step's own process. Set training.num_gpus to 2 or more to shard."
        )
    return None
