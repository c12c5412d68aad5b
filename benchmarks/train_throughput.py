"""Training throughput of the pipeline's train_sft code path, per backend, on a published model shape.

Each run goes through what the pipeline's steps do: `backend.load_quantized` (load_base_model),
`backend.add_lora` (inject_lora), then `backend.load_trainable` + `llmtune.training.train` (train_sft),
on a random-init model of the published shape and synthetic token data. A run name ending in `-<N>gpu`
(`hf-2gpu`, `unsloth-2gpu`) trains data-parallel on N GPUs through the same path with `training.num_gpus=N`
(`llmtune.distributed`: accelerate launch, one process per GPU, batch --batch per GPU) and is compared
with its one-GPU run; one-GPU runs see only the first GPU. `reference` is a minimal
plain-Unsloth loop (FastLanguageModel 4-bit + get_peft_model + a bare PyTorch AdamW loop) on the same
model, data and settings, the yardstick for the pipeline's unsloth path. Each run is its own
subprocess, because importing unsloth patches transformers for the whole process.

Printed per run: trained tokens/s (padding excluded, steady state after warm-up steps), peak GPU memory
(allocated, from the start of training), and MFU: model FLOPs (`llmtune.gpu.lora_training_flops`) per
second over a bf16 matmul ceiling measured at the start of the same invocation. Then a table, the
target checks, and one JSON line (also written to --json).

    python benchmarks/train_throughput.py --shape llama-3.2-1b --runs hf,unsloth,reference
    python benchmarks/train_throughput.py --shape llama-3.1-8b --runs unsloth --batch 2
    python benchmarks/train_throughput.py --shape llama-3.2-1b --runs unsloth-padded,unsloth-packed --data length-mix
    python benchmarks/train_throughput.py --shape llama-3.2-1b --runs hf,hf-2gpu,unsloth,unsloth-2gpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# run name -> (backend, packing); "reference" is the plain-Unsloth loop. Any of them + "-<N>gpu": on N GPUs.
RUNS = {
    "hf": ("hf", False),
    "unsloth": ("unsloth", False),
    "reference": ("reference", False),
    "hf-padded": ("hf", False),
    "unsloth-padded": ("unsloth", False),
    "unsloth-packed": ("unsloth", True),
    "hf-packed": ("hf", True),
    # Diagnostic, not the pipeline as shipped: train() with the model's own fused loss instead of TRL's fused
    # LM head (which also computes entropy and top-1 accuracy each step), to size that cost.
    "unsloth-own-loss": ("unsloth", False),
    # Diagnostic: train() with batches collated by 2 pinned-memory loader workers, ahead of the GPU.
    "unsloth-workers": ("unsloth", False),
    # Diagnostic: without Unsloth's automatic padding-free batching (UNSLOTH_DISABLE_AUTO_PADDING_FREE=1), i.e.
    # padded [batch, seq] batches as the reference loop feeds them.
    "unsloth-no-padding-free": ("unsloth", False),
}


TIMES_ENV = "LLMTUNE_BENCH_STEP_TIMES"  # where rank 0's step timer writes, for runs in other processes


def run_spec(name: str) -> tuple[str, bool, int]:
    """(backend, packing, GPUs) of a run name: one of RUNS, optionally ending in "-<N>gpu" (data-parallel on N).

    >>> run_spec("unsloth-2gpu"), run_spec("hf-padded")
    (('unsloth', False, 2), ('hf', False, 1))
    """
    base, _, suffix = name.rpartition("-")
    if base in RUNS and suffix.endswith("gpu") and suffix[:-3].isdigit():
        return (*RUNS[base], int(suffix[:-3]))
    return (*RUNS[name], 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", help="llama-3.2-1b or llama-3.1-8b (published configs)")
    p.add_argument(
        "--runs", default="hf,unsloth,reference", help=f"comma list of: {', '.join(RUNS)}; each may end in -2gpu"
    )
    p.add_argument("--data", default="full", choices=["full", "length-mix"], help="all rows --seq long, or a mix")
    p.add_argument("--seq", type=int, default=2048, help="max sequence length (every row in --data full)")
    p.add_argument("--batch", type=int, default=8, help="per-device batch size")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (all linear layers)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--hf-gradient-checkpointing", action="store_true", help="hf with checkpointing (default off)")
    p.add_argument("--model-dir", default=None, help="reuse a model folder (else built under --work)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one benchmark in this process
    return p.parse_args(argv)


# ---------------------------------------------------------------- parent: orchestrate, measure the ceiling, report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmtune-bench-"))
    model_dir = Path(args.model_dir) if args.model_dir else build_model(args.shape, work / args.shape)
    ceiling = matmul_ceiling()
    print(f"bf16 matmul ceiling measured: {ceiling:.0f} TFLOP/s", flush=True)
    results = [run_in_subprocess(name, args, model_dir, work) for name in args.runs.split(",")]
    summary = {"shape": args.shape, "settings": settings(args), "matmul_tflops": round(ceiling, 1)}
    for r in results:
        if "error" not in r:
            r["mfu"] = round(r["model_tflops"] / (ceiling * r["gpus"]), 4)  # against the ceiling of every GPU used
    summary.update(runs=results, checks=target_checks(args, results))
    print_table(summary)
    line = json.dumps(summary)
    print("RESULT " + line, flush=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0 if all("error" not in r for r in results) else 1


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("data", "seq", "batch", "rank", "steps", "warmup", "hf_gradient_checkpointing")
    return {k: getattr(args, k) for k in keys}


def build_model(shape: str, out: Path) -> Path:
    """The random-init model of `shape` in bf16, built once in a subprocess (keeps this process torch-only)."""
    if not (out / "config.json").is_file():
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from llmtune.demo import build_demo_tokenizer, make_demo_rows;"
            "from llmtune.gpu import build_random_llama;"
            "build_random_llama(sys.argv[2], sys.argv[3], build_demo_tokenizer(make_demo_rows(400, seed=0)))"
        )
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(ROOT), str(out), shape], check=True)
        print(f"built random-init {shape} in {time.perf_counter() - started:.0f} s: {out}", flush=True)
    return out


def matmul_ceiling() -> float:
    from llmtune.gpu import measure_matmul_tflops, release_cached_memory

    value = max(measure_matmul_tflops() for _ in range(3))
    release_cached_memory()
    return value


def run_in_subprocess(name: str, args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    child_args = [a for a in sys.argv[1:] if not a.startswith("--child")]
    result_file = work / f"{name}.json"
    cmd = [sys.executable, __file__, *child_args, "--child", name, "--model-dir", str(model_dir)]
    cmd += ["--work", str(work), "--json", str(result_file)]
    print(f"\n=== {name} ===", flush=True)
    proc = subprocess.run(cmd, env=child_env(run_spec(name)[2]))
    if proc.returncode != 0 or not result_file.is_file():
        return {"run": name, "error": f"exit code {proc.returncode}"}
    return json.loads(result_file.read_text())


def child_env(gpus: int) -> dict[str, str]:
    """A one-GPU run sees only the first GPU, as on a one-GPU machine; a data-parallel run sees them all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def target_checks(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets that these runs can decide, each with the measured ratio."""
    by = {r["run"]: r for r in results if "error" not in r}
    checks: dict[str, Any] = {}

    def ratio(a: str, b: str, key: str) -> float | None:
        return round(by[a][key] / by[b][key], 3) if a in by and b in by and by[b][key] else None

    if (r := ratio("unsloth", "reference", "tokens_per_s")) is not None:
        checks["unsloth_vs_reference_tokens_per_s"] = {"ratio": r, "target": ">= 0.95", "met": r >= 0.95}
    if (r := ratio("unsloth", "hf", "tokens_per_s")) is not None:
        checks["unsloth_vs_hf_tokens_per_s"] = {"ratio": r, "target": ">= 5", "met": r >= 5}
    if (r := ratio("unsloth", "hf", "peak_gib")) is not None:
        checks["unsloth_vs_hf_peak_memory"] = {"ratio": r, "target": "<= 0.125", "met": r <= 0.125}
    if (r := ratio("unsloth-packed", "unsloth-padded", "tokens_per_s")) is not None:
        checks["packed_vs_padded_tokens_per_s"] = {"ratio": r, "target": ">= 2", "met": r >= 2}
    for name in by:
        gpus = run_spec(name)[2]
        single = name.rpartition("-")[0]
        if gpus > 1 and (r := ratio(name, single, "tokens_per_s")) is not None:
            target = round(0.9 * gpus, 2)  # 1.8x on 2 GPUs
            checks[f"{name}_vs_{single}_tokens_per_s"] = {"ratio": r, "target": f">= {target}", "met": r >= target}
    if args.shape == "llama-3.1-8b" and "unsloth" in by:
        peak = by["unsloth"]["peak_gib"]
        checks["8b_peak_memory_gib"] = {"value": peak, "target": "< 12 at batch 2 x 2048", "met": peak < 12}
    return checks


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{summary['shape']}  {summary['settings']}  ceiling {summary['matmul_tflops']} TFLOP/s")
    print(f"{'run':16} {'tokens/s':>10} {'peak GiB':>9} {'reserved':>9} {'MFU':>6} {'loss first->last':>18}")
    for r in summary["runs"]:
        if "error" in r:
            print(f"{r['run']:16} failed: {r['error']}")
            continue
        losses = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        print(
            f"{r['run']:16} {r['tokens_per_s']:>10.0f} {r['peak_gib']:>9.2f} {r['reserved_gib']:>9.2f} "
            f"{r['mfu']:>6.1%} {losses:>18}"
        )
    for name, check in summary["checks"].items():
        print(f"  {name}: {check}")


# ---------------------------------------------------------------- child: one run in its own process


def run_child(args: argparse.Namespace) -> int:
    backend_name, packing, gpus = run_spec(args.child)
    from llmtune.backends import import_unsloth_if_used

    if args.child == "unsloth-no-padding-free":
        os.environ["UNSLOTH_DISABLE_AUTO_PADDING_FREE"] = "1"  # read when unsloth is imported
    # Before transformers, peft and trl are imported, as the CLI does.
    import_unsloth_if_used("unsloth" if backend_name in ("unsloth", "reference") else "hf")
    rows = dataset_rows(args, gpus)
    args.lengths = [len(r) for r in rows]
    if backend_name == "reference":
        result = run_reference(args, rows)
    else:
        result = run_pipeline_path(args, backend_name, packing, gpus, rows)
    result["run"] = args.child
    Path(args.json).write_text(json.dumps(result))
    print(json.dumps(result), flush=True)
    return 0


def dataset_rows(args: argparse.Namespace, gpus: int = 1) -> list[list[int]]:
    """Token rows for warm-up + timed steps on every GPU: all --seq long, or the committed realistic length mix."""
    import random

    from benchmarks.length_mix import sample_lengths

    count = (args.warmup + args.steps) * args.batch * gpus
    # The mix gets enough rows that packed batches (several rows each) never run out.
    full = args.data == "full"
    lengths = [args.seq] * count if full else sample_lengths(count * 16, max_length=args.seq, seed=0)
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    low, high = min(1000, vocab // 2), min(32000, vocab)  # above the demo tokenizer's special tokens
    rng = random.Random(0)
    return [[rng.randrange(low, high) for _ in range(n)] for n in lengths]


def run_pipeline_path(
    args: argparse.Namespace, backend_name: str, packing: bool, gpus: int, rows: list[list[int]]
) -> dict[str, Any]:
    """load_base_model -> inject_lora -> train_sft, as the steps call the library (train_sft: `train_adapter`)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llmtune import distributed, gpu, training
    from llmtune.backends import resolve_backend
    from llmtune.config import LoraConfig, ModelConfig, TrainingConfig

    backend = resolve_backend(backend_name)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-", dir=args.work))
    backend.load_quantized(ModelConfig(name=args.model_dir, backend=backend_name), work / "base")
    backend.add_lora(work / "base", LoraConfig(r=args.rank, alpha=2 * args.rank), work / "adapter")
    Dataset.from_dict({"input_ids": rows, "labels": rows}).save_to_disk(str(work / "train"))
    AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(str(work / "tokenizer"))
    gpu.release_cached_memory()
    gc_on = backend_name == "unsloth" or args.hf_gradient_checkpointing
    extra = {"packing": True} if packing else {}
    cfg = TrainingConfig(
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=2e-4,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=10,  # the pipeline's default
        gradient_checkpointing=gc_on,
        num_gpus=gpus,
        **extra,
    )
    install_diagnostic(args.child, training)
    job = distributed.TrainJob(
        backend=backend_name,
        base_dir=str(work / "base"),
        adapter_dir=str(work / "adapter"),
        train_dir=str(work / "train"),
        tokenizer_dir=str(work / "tokenizer"),
        training=cfg.model_dump(),
        max_seq_length=args.seq,
        out_dir=str(work / "trained"),
        callbacks=["benchmarks.train_throughput:step_timer"],
    )
    os.environ[TIMES_ENV] = str(work / "step_times.json")  # inherited by data-parallel workers
    report = distributed.train_adapter(job, gpus)
    timed = json.loads((work / "step_times.json").read_text())
    losses = [p["loss"] for p in report["loss_history"]]
    return measure(
        args,
        [tuple(step) for step in timed["steps"]],
        losses,
        timed["model"],
        peak_gib=report["peak_gpu_memory_gib"],
        reserved_gib=timed["reserved_gib"],
        gpus=gpus,
        backend=backend.NAME,
        gradient_checkpointing=gc_on,
    )


def install_diagnostic(run: str, training: Any) -> None:
    """The diagnostic runs change one thing in `llmtune.training` (in this process: one-GPU runs only)."""
    if run == "unsloth-own-loss":
        training._fused_lm_head_runs = lambda tensor: False
    if run == "unsloth-workers":
        shipped = training.sft_config

        def with_workers(*a: Any, **k: Any) -> Any:
            sft = shipped(*a, **k)
            sft.dataloader_num_workers, sft.dataloader_pin_memory = 2, True
            return sft

        training.sft_config = with_workers


def step_timer() -> Any:
    """A TrainerCallback (passed through `train`'s callbacks) that stamps every optimizer step.

    It waits for the GPU at each step end and asks the Trainer to count non-padding input tokens, which the
    Trainer sums over data-parallel processes. When training ends, rank 0 writes the stamps, the model's
    matmul weights and its reserved GPU memory to $LLMTUNE_BENCH_STEP_TIMES (workers run in other processes).
    """
    import torch
    from transformers import TrainerCallback

    from llmtune.gpu import GIB

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []
            self.model: dict[str, int] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            args.include_num_input_tokens_seen = "non_padding"  # read by the Trainer at every batch
            self.model = model_shape(model)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                reserved = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else 0.0
                record = {"steps": self.steps, "model": self.model, "reserved_gib": round(reserved, 3)}
                Path(os.environ[TIMES_ENV]).write_text(json.dumps(record))

    return StepTimer()


def model_shape(model: Any) -> dict[str, int]:
    """What model FLOPs are computed from: matmul weights (frozen, trainable), layers and hidden size."""
    from llmtune.gpu import matmul_params

    frozen, trainable = matmul_params(model)
    config = model.config
    return {
        "frozen": frozen,
        "trainable": trainable,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def measure(
    args: argparse.Namespace,
    steps: list[tuple[float, int]],
    losses: list[float],
    shape: dict[str, int],
    peak_gib: float,
    reserved_gib: float,
    gpus: int = 1,
    **info: Any,
) -> dict[str, Any]:
    """Steady-state tokens/s over the timed steps (all GPUs together), peak memory per GPU, model TFLOP/s."""
    (t0, n0), (t1, n1) = steps[args.warmup - 1], steps[-1]
    tokens, seconds = n1 - n0, t1 - t0
    if tokens <= 0:  # the Trainer did not count tokens: every timed step had batch x seq of them on each GPU
        tokens = args.batch * args.seq * (len(steps) - args.warmup) * gpus
    return {
        **info,
        "gpus": gpus,
        "tokens_per_s": round(tokens / seconds, 1),
        "timed_steps": len(steps) - args.warmup,
        "timed_tokens": tokens,
        "seconds": round(seconds, 3),
        "peak_gib": round(peak_gib, 3),
        "reserved_gib": round(reserved_gib, 3),
        "model_tflops": round(model_flops(shape, tokens, args.lengths) / seconds / 1e12, 2),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
    }


def model_flops(shape: dict[str, int], tokens: int, lengths: list[int]) -> float:
    """Model FLOPs of training on `tokens` tokens drawn from examples of these lengths (see lora_training_flops)."""
    from llmtune.gpu import lora_training_flops

    over_all = lora_training_flops(shape["frozen"], shape["layers"], shape["hidden"], lengths, shape["trainable"])
    return over_all * tokens / sum(lengths)


def run_reference(args: argparse.Namespace, rows: list[list[int]]) -> dict[str, Any]:
    """Minimal plain Unsloth: FastLanguageModel 4-bit + get_peft_model + a bare PyTorch loop, same settings."""
    import torch
    from unsloth import FastLanguageModel

    from llmtune import gpu

    model, _ = FastLanguageModel.from_pretrained(args.model_dir, max_seq_length=args.seq, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth",
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    gpu.release_cached_memory()
    gpu.reset_peak_memory()
    steps: list[tuple[float, int]] = []
    losses = []
    for step in range(args.warmup + args.steps):
        batch = torch.tensor(rows[step * args.batch : (step + 1) * args.batch], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the Trainer also reads the loss each logging step (here every step)
        torch.cuda.synchronize()
        steps.append((time.perf_counter(), (step + 1) * batch.numel()))
    reserved = torch.cuda.max_memory_reserved() / gpu.GIB
    return measure(
        args,
        steps,
        losses,
        model_shape(model),
        peak_gib=gpu.peak_memory_gib(),
        reserved_gib=reserved,
        backend="unsloth (plain loop)",
        gradient_checkpointing=True,
    )


if __name__ == "__main__":
    sys.exit(main())
