"""One rank of the CPU FSDP2 check in tests/test_fsdp.py (run under torch.distributed.run with gloo).

Each rank trains the same batch twice from the same 4-bit base and adapter, `STEPS` SGD steps: once whole, once
with every decoder layer and the model sharded by FSDP2 across the ranks. It writes what it saw to
`OUT/rank-N.json`, and rank 0 saves the sharded model's gathered adapter to `OUT/adapter` as training does
(`llmtune.model.lora_variants.save_trained`: PEFT's save_pretrained with the gathered state).

Usage: python -m torch.distributed.run --nproc-per-node 2 -m tests.fsdp_worker BASE ADAPTER OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llmtune.model import hf, lora_variants
from llmtune.train import fsdp

LEARNING_RATE = 0.05
STEPS = 8


def trainable(base: str, adapter: str) -> Any:
    return PeftModel.from_pretrained(hf.load_base(base), adapter, is_trainable=True)


def train(model: Any, ids: torch.Tensor) -> list[float]:
    """`STEPS` of forward + backward on `ids` (next-token loss) and plain SGD on the trainable weights."""
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param -= LEARNING_RATE * param.grad
                    param.grad = None
        losses.append(float(loss))
    return losses


def shard(model: Any) -> None:
    """FSDP2 over 2 CPU ranks, one unit per decoder layer and one for the rest, as accelerate wraps on GPU."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main(base: str, adapter: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(7))
    whole = trainable(base, adapter)
    whole_losses = train(whole, ids)
    whole_state = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}

    sharded = trainable(base, adapter)
    shard(sharded)
    params = list(sharded.parameters())
    frozen_4bit = [p for p in params if isinstance(p, DTensor) and not p.requires_grad and p.dim() == 2]
    sharded_losses = train(sharded, ids)  # the same rows on both ranks: the averaged gradient is this one's
    gathered = fsdp.full_adapter_state(sharded)
    record = {
        "rank": rank,
        "params": len(params),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "frozen_4bit_local_rows": sum(p.to_local().shape[0] for p in frozen_4bit),
        "frozen_4bit_rows": sum(p.shape[0] for p in frozen_4bit),
        "whole_losses": whole_losses,
        "sharded_losses": sharded_losses,
        "gathered_keys_match": sorted(gathered) == sorted(whole_state),
        "max_weight_difference": max(float((gathered[n] - whole_state[n]).abs().max()) for n in whole_state),
        "max_weight_change": max(
            float((gathered[n] - p).abs().max())
            for n, p in trainable(base, adapter).named_parameters()
            if p.requires_grad
        ),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        lora_variants.save_trained(sharded, os.path.join(out, "adapter"), adapter, gathered)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
