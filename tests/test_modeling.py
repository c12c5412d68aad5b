"""The real QLoRA path on the tiny model: bitsandbytes 4-bit, PEFT LoRA, TRL training, 16-bit merge."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtune.config import LoraConfig, TrainingConfig
from llmtune.model import hf, resolve_backend
from llmtune.train import sft


def test_auto_backend_is_hf_without_cuda() -> None:
    assert resolve_backend("auto").NAME == "hf"


def test_base_loads_as_nf4_linear4bit_with_double_quant(quantized_dir: Path) -> None:
    import bitsandbytes as bnb

    model = hf.load_base(quantized_dir)
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, bnb.nn.Linear4bit)
    state = proj.weight.quant_state  # type: ignore[attr-defined]  # a bnb Params4bit
    assert state.quant_type == "nf4"
    assert state.nested, "double quantization keeps a nested quant state"
    assert hf.quantization_report(model)["linear4bit_layers"] == 2 * 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path, prepared_dir: Path) -> dict:
    """Inject LoRA, train 40 steps with TRL, save; keep what the assertions need."""
    work = tmp_path_factory.mktemp("train")
    lora = hf.add_lora(quantized_dir, LoraConfig(), work / "adapter0")
    model = hf.load_trainable(quantized_dir, work / "adapter0", gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_before = {n: b.detach().clone() for n, b in model.named_parameters() if "lora_" not in n}
    packed_before = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    cfg = TrainingConfig(
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        logging_steps=1,
        warmup_steps=0,
        lr_scheduler_type="cosine",
    )
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer")
    metrics: list[tuple[str, float, int]] = []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # not a terminal: one progress line per logging step
        report = sft.train(
            model,
            tokenizer,
            load_from_disk(str(prepared_dir / "train")),
            cfg,
            work / "t",
            128,
            on_metric=lambda name, value, step: metrics.append((name, value, step)),
        )
    model.save_pretrained(str(work / "adapter"))
    return {
        "printed": printed.getvalue(),
        "metrics": metrics,
        "model": model,
        "before": before,
        "base_before": base_before,
        "packed_before": packed_before,
        "report": report,
        "lora": lora,
        "adapter": work / "adapter",
        "work": work,
    }


def test_only_adapter_parameters_are_trainable(trained: dict) -> None:
    trainable = [n for n, p in trained["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert trained["lora"]["trainable_params"] == sum(
        p.numel() for n, p in trained["model"].named_parameters() if p.requires_grad
    )
    assert set(trained["lora"]["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_training_changes_adapter_and_not_base(trained: dict) -> None:
    params = dict(trained["model"].named_parameters())
    lora_b = [n for n in params if "lora_B" in n]
    assert all(not torch.equal(params[n].float(), trained["before"][n].float()) for n in lora_b)
    assert all(torch.equal(params[n], trained["base_before"][n]) for n in trained["base_before"])
    packed = trained["model"].base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(packed, trained["packed_before"]), "4-bit base weights untouched"


def test_loss_falls(trained: dict) -> None:
    losses = [p["loss"] for p in trained["report"]["loss_history"]]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses


PROGRESS_LINE = re.compile(
    r"^step (\d+)/40 \(\d+%\) \| loss [\d.]+ \| lr [\d.]+e[-+]\d+ \| grad norm [\d.e+-]+ \| [\d,]+ tokens/s "
    r"\| elapsed \d+:\d\d \| ETA \d+:\d\d$"
)


def test_training_prints_one_progress_line_per_logging_step_off_a_terminal(trained: dict) -> None:
    lines = [line for line in trained["printed"].splitlines() if line.startswith("step ")]
    steps = [int(m.group(1)) for line in lines if (m := PROGRESS_LINE.match(line))]
    assert steps == list(range(1, 41)), lines[:3]
    assert "{'loss'" not in trained["printed"], "the Trainer's own log dictionaries are not printed"
    assert lines[-1].endswith("ETA 0:00")


def test_learning_rate_and_grad_norm_are_handed_on_per_logging_step(trained: dict) -> None:
    for name in sft.STEP_CURVES:
        points = [(value, step) for n, value, step in trained["metrics"] if n == name]
        assert [step for _, step in points] == list(range(1, 41)), name
        assert [p[name] for p in trained["report"]["loss_history"]] == [value for value, _ in points]
    rates = [value for n, value, _ in trained["metrics"] if n == "learning_rate"]
    assert rates[0] == pytest.approx(3e-3, rel=0.01) and rates[-1] < rates[20] < rates[0], "cosine from the peak"


def test_progress_is_a_bar_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import TrainerState

    progress = sft.TrainingProgress(tokens_per_step=1000, use_bar=True)
    state = TrainerState(max_steps=5, global_step=0)
    progress.on_train_begin(None, state, None)
    for step in range(1, 6):
        state.global_step = step
        progress.on_log(None, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5})
        progress.on_step_end(None, state, None)
    progress.on_train_end(None, state, None)
    captured = capsys.readouterr()
    assert captured.out == "", "no per-step lines under a bar"
    assert "train: 100%" in captured.err and "5/5" in captured.err
    assert "loss 0.4 | lr 1.00e-03 | grad norm 0.5" in captured.err


def test_a_diverged_step_stops_training_with_what_to_change(
    tmp_path: Path, quantized_dir: Path, prepared_dir: Path
) -> None:
    """A NaN loss must reach LossHistory's check: the Trainer's NaN filter would log it as the running mean."""
    hf.add_lora(quantized_dir, LoraConfig(r=4, alpha=8), tmp_path / "adapter0")
    model = hf.load_trainable(quantized_dir, tmp_path / "adapter0", gradient_checkpointing=False)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.fill_(float("nan"))  # every forward now gives a NaN loss, as a diverged run does
    cfg = TrainingConfig(max_steps=3, per_device_train_batch_size=4, logging_steps=1, warmup_steps=0)
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer")
    with pytest.raises(sft.TrainingError, match=r"loss became nan at step 1.*learning_rate"):
        sft.train(model, tokenizer, load_from_disk(str(prepared_dir / "train")), cfg, tmp_path / "t", 128)
