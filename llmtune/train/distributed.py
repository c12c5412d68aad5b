"""The train step's training, in its own process or data-parallel under `accelerate launch`, one process per GPU.

`train_adapter(job, processes)` trains the adapter a `TrainJob` describes (paths and the typed training
section) into `job.out_dir` and returns the `TrainingReport`. With one process that happens
here. With `training.num_gpus` above 1 (or 0 and several GPUs visible), `train_data_parallel` writes the job
to a file and runs `accelerate launch --multi_gpu --num_processes N -m llmtune.train.distributed JOB`. Each process
loads the 4-bit base and the adapter onto its own GPU through the same backend function as a one-GPU run
(`load_trainable`), and trains with the same `llmtune.train.sft.train`: the Trainer sees the launch, wraps the
model in DistributedDataParallel and gives every process its own rows of each step, so a step trains on
`num_gpus x per_device_train_batch_size` rows and only the LoRA gradients travel between GPUs. Rank 0 saves
the adapter into the job's `out_dir` and the report beside it (`job.report_file`); the caller waits, reads the
report back and hands the loss curve to its `on_loss` callback. A failure on any rank ends the launch; a GPU
out-of-memory error comes back as `GpuOutOfMemory` with the settings to lower, anything else as `TrainingError`
naming the rank.

This module imports no ML library at import time, so a worker can import unsloth before transformers.

Example:
    >>> processes_for(requested=2, visible=2), processes_for(requested=0, visible=4), processes_for(0, 0)
    (2, 4, 1)
    >>> processes_for(requested=4, visible=2)
    Traceback (most recent call last):
    ...
    llmtune.train.distributed.DataParallelError: training.num_gpus=4 but 2 CUDA GPUs are visible here. ...
    >>> launch_command(2, "/tmp/job.json", port=29501, python="python")[:8]
    ['python', '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1']
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune.artifacts import TrainingReport
from llmtune.config import TrainingConfig
from llmtune.errors import LlmtuneError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Lines of the launch's output kept for the error message when it fails without saying why.
OUTPUT_TAIL_LINES = 40


class DataParallelError(LlmtuneError):
    """Data-parallel training cannot start as configured; the message says what to set."""


@dataclasses.dataclass
class TrainJob:
    """Everything a worker process needs: paths, the typed training section, and the sequence length.

    The trained adapter is saved by `lora_variants.save_trained`: one trained from a PiSSA/OLoRA init
    (`adapter_dir`'s config says so) lands converted to a plain LoRA on the base.

    `callbacks` are "module:function" names, each called with no arguments in every worker to make one
    more TrainerCallback (the throughput benchmark times steps with one). The adapter lands in `out_dir`
    and the training report in `report_file` (next to it, not inside it).
    """

    backend: str
    base_dir: str
    adapter_dir: str
    train_dir: str
    tokenizer_dir: str
    training: TrainingConfig
    max_seq_length: int
    out_dir: str
    checkpoint_dir: str | None = None
    callbacks: list[str] = dataclasses.field(default_factory=list)
    eval_dir: str | None = None  # the prepared eval split, for training.eval_steps
    backend_note: str = ""  # why `backend` is not the configured one (a LoRA variant Unsloth cannot run), if so

    @property
    def report_file(self) -> Path:
        return Path(self.out_dir).with_name(Path(self.out_dir).name + "-training-report.json")

    def write(self, path: str | Path) -> Path:
        fields = {**dataclasses.asdict(self), "training": self.training.model_dump()}
        Path(path).write_text(json.dumps(fields, indent=2))
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> TrainJob:
        fields = json.loads(Path(path).read_text())
        return cls(**{**fields, "training": TrainingConfig(**fields["training"])})


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_for(requested: int, visible: int) -> int:
    """How many training processes `training.num_gpus=requested` means with `visible` CUDA GPUs here."""
    if requested == 0:
        return max(visible, 1)
    if requested <= 1 or requested <= visible:
        return requested
    if visible == 0:
        raise DataParallelError(
            f"training.num_gpus={requested} needs {requested} CUDA GPUs and none is visible here. "
            "Set training.num_gpus=1 to train in the step's own process (on the CPU when there is no GPU)."
        )
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
    raise DataParallelError(
        f"training.num_gpus={requested} but {visible} CUDA GPU{'s are' if visible > 1 else ' is'} visible "
        f"here{where}. Set training.num_gpus={visible}, or 0 for every visible GPU."
    )


def launch_command(processes: int, job_file: str | Path, port: int, python: str = sys.executable) -> list[str]:
    """`accelerate launch` running this module's worker in `processes` processes on this machine.

    Mixed precision is left to the Trainer (bf16 where the GPU has it), and the port is chosen free
    so that two trainings on one machine do not collide.
    """
    return [
        python,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "llmtune.train.distributed",
        str(job_file),
    ]


def free_port() -> int:
    """A TCP port nothing listens on now, for the launch's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env() -> dict[str, str]:
    """This process's environment, with the project importable in the workers wherever the launch starts."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def train_adapter(
    job: TrainJob,
    processes: int = 1,
    on_loss: Callable[[float, int], None] | None = None,
    on_metric: Callable[[str, float, int], None] | None = None,
    on_eval: Callable[[float, int], None] | None = None,
) -> TrainingReport:
    """Train `job`'s adapter in this process (`processes=1`) or data-parallel in `processes` processes.

    Either way the trained adapter lands in `job.out_dir`. `on_loss(loss, step)` gets the loss curve,
    `on_metric(name, value, step)` the learning-rate and grad-norm curves and `on_eval(loss, step)` the eval
    loss curve: as training goes in this process, at the end from rank 0's report when the workers ran elsewhere.
    """
    job = for_parallelism(job, processes)
    if processes <= 1:
        return train_this_rank(job, rank=0, on_loss=on_loss, on_metric=on_metric, on_eval=on_eval)
    report = train_data_parallel(job, processes)
    for point in report.loss_history:
        step = int(point["step"])
        if on_loss is not None:
            on_loss(point["loss"], step)
        for name, value in point.items():
            if on_metric is not None and name not in ("step", "loss"):
                on_metric(name, value, step)
    if on_eval is not None:
        for point in report.eval_history:
            on_eval(point["eval_loss"], int(point["step"]))
    return report


def for_parallelism(job: TrainJob, processes: int) -> TrainJob:
    """`job` as it trains on `processes` processes: fsdp with one process trains unsharded, and fsdp trains
    with the hf backend (see `llmtune.train.fsdp`); each change is printed for the step log."""
    from llmtune.train import fsdp

    note = fsdp.single_process_note(job.training, processes)
    if note:
        print(note, flush=True)
        return dataclasses.replace(job, training=job.training.model_copy(update={"parallelism": "ddp"}))
    backend, why = fsdp.training_backend(job.backend, job.training)
    if why:
        print(why, flush=True)
        return dataclasses.replace(job, backend=backend, backend_note=why)
    return job


def train_data_parallel(job: TrainJob, processes: int) -> TrainingReport:
    """Train `job` in `processes` processes and wait; return rank 0's report (the adapter is in `job.out_dir`)."""
    job_dir = Path(tempfile.mkdtemp(prefix="llmtune-data-parallel-"))
    job_file = job.write(job_dir / "job.json")
    code, tail = run_streaming(launch_command(processes, job_file, free_port()), worker_env())
    if code != 0 or not job.report_file.is_file():
        raise launch_failure(job_dir, code, tail, processes)
    return TrainingReport.model_validate_json(job.report_file.read_text())


def run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `cmd`, echoing its output through this process's stdout (so step logs show progress); keep the tail."""
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
    return proc.returncode, list(tail)


def launch_failure(job_dir: Path, code: int, tail: list[str], processes: int) -> Exception:
    """The error to raise for a failed launch: the first rank's own error, else the launch's last output lines."""
    from llmtune.train.memory import GpuOutOfMemory
    from llmtune.train.sft import TrainingError

    errors = [json.loads(p.read_text()) for p in sorted(job_dir.glob("error-rank-*.json"))]
    for error in errors:
        if error["out_of_memory"]:
            return GpuOutOfMemory(error["message"])
    if errors:
        first = errors[0]
        return TrainingError(
            f"Data-parallel training on {processes} GPUs failed on rank {first['rank']}: {first['message']}\n"
            f"{first['traceback']}"
        )
    return TrainingError(
        f"Data-parallel training on {processes} GPUs exited with code {code}. Last output:\n" + "\n".join(tail)
    )


# ---------------------------------------------------------------- the worker: one process per GPU


def main(argv: list[str] | None = None) -> int:
    """Worker entry point (`python -m llmtune.train.distributed JOB`, under accelerate launch)."""
    job_file = Path((argv if argv is not None else sys.argv[1:])[0])
    job = TrainJob.read(job_file)
    from llmtune.model import import_unsloth_if_used

    import_unsloth_if_used(job.backend)  # before transformers, peft and trl, as in the CLI
    rank = int(os.environ.get("RANK", "0"))
    try:
        train_this_rank(job, rank)
    except BaseException as err:
        record_error(job_file.parent, rank, err)
        raise
    end_process_group()
    return 0


def end_process_group() -> None:
    """Leave the process group the Trainer joined, so each rank exits cleanly (torch warns otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train_this_rank(
    job: TrainJob,
    rank: int,
    on_loss: Callable[[float, int], None] | None = None,
    on_metric: Callable[[str, float, int], None] | None = None,
    on_eval: Callable[[float, int], None] | None = None,
) -> TrainingReport:
    """Load the 4-bit base + adapter on this process's GPU, train, and on rank 0 save the adapter and report.

    A GPU out-of-memory error here becomes `GpuOutOfMemory`, naming the settings to lower.
    """
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from llmtune.model import lora_variants, resolve_backend
    from llmtune.train import fsdp, memory, sft

    use_this_processes_gpu()
    cfg = job.training
    backend = resolve_backend(job.backend)
    memory.reset_peak_memory()
    with memory.explain_oom(memory_settings(job, cfg)):
        model = backend.load_trainable(
            job.base_dir, job.adapter_dir, fsdp.trainer_checkpointing(cfg), max_seq_length=job.max_seq_length
        )
        result = sft.train(
            model,
            AutoTokenizer.from_pretrained(job.tokenizer_dir),
            load_from_disk(job.train_dir),
            cfg,
            tempfile.mkdtemp(prefix="llmtune-train-"),
            job.max_seq_length,
            callbacks=[make_callback(name) for name in job.callbacks],
            checkpoint_dir=job.checkpoint_dir,
            on_loss=on_loss,
            on_metric=on_metric,
            eval_dataset=load_from_disk(job.eval_dir) if job.eval_dir and cfg.eval_steps else None,
            on_eval=on_eval,
        )
    report = TrainingReport(
        **result,
        backend=backend.NAME,
        backend_note=job.backend_note,
        peak_gpu_memory_gib=round(memory.peak_memory_gib(), 3),  # per GPU: rank 0's
        hardware=memory.describe_hardware(),
    )
    # Under FSDP every rank holds a shard of the adapter: all of them take part in gathering it for rank 0.
    state = fsdp.full_adapter_state(model) if fsdp.enabled(cfg) and world_size() > 1 else None
    if rank == 0:
        lora_variants.save_trained(model, job.out_dir, job.adapter_dir, state)
        job.report_file.write_text(report.model_dump_json(indent=2))
    return report


def world_size() -> int:
    """Processes training together: the launch's WORLD_SIZE, 1 in the step's own process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_this_processes_gpu() -> None:
    """Make LOCAL_RANK's GPU the current one before anything allocates, so no rank touches another's GPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def memory_settings(job: TrainJob, cfg: TrainingConfig) -> Any:
    from llmtune.artifacts import Adapter
    from llmtune.train.memory import TrainingMemorySettings

    lora_r = Adapter(job.adapter_dir).config()["r"]
    return TrainingMemorySettings(
        cfg.per_device_train_batch_size, job.max_seq_length, lora_r, cfg.gradient_checkpointing
    )


def make_callback(name: str) -> Any:
    """The TrainerCallback made by the function named "module:function"."""
    import importlib

    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)()


def record_error(job_dir: Path, rank: int, err: BaseException) -> None:
    """Leave this rank's error for the launching process, which reports the first one."""
    from llmtune.train.memory import GpuOutOfMemory, is_oom

    record = {
        "rank": rank,
        "out_of_memory": isinstance(err, GpuOutOfMemory) or is_oom(err),
        "message": str(err) or type(err).__name__,
        "traceback": "".join(traceback.format_exception(err)[-6:]),
    }
    (job_dir / f"error-rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
