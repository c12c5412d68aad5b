"""Every LoRA variant (DoRA, rsLoRA, the gaussian/PiSSA/OLoRA inits, modules_to_save) trains on the tiny 4-bit
model with the hf backend, and its export passes the merge check: the streamed 16-bit merge computes what the
16-bit base + trained adapter compute through PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from llmtune import release
from llmtune.artifacts import PreparedData, TrainingReport
from llmtune.config import ExportConfig, LoraConfig, ModelConfig, RunConfig, TrainingConfig
from llmtune.model import hf, lora_variants
from llmtune.model import unsloth_backend as us
from llmtune.release import merge
from llmtune.train import distributed

SMALL = {"r": 4, "alpha": 8, "seed": 1}
VARIANTS = {
    "dora": LoraConfig(**SMALL, use_dora=True),
    "rslora": LoraConfig(**SMALL, use_rslora=True),
    "gaussian": LoraConfig(**SMALL, init="gaussian"),
    "pissa": LoraConfig(**SMALL, init="pissa"),
    "olora": LoraConfig(**SMALL, init="olora"),
    "modules_to_save": LoraConfig(**SMALL, modules_to_save=["lm_head"]),
}
# A few steps at a learning rate high enough that the adapter moves the logits by more than the check's tolerance.
TRAINING = TrainingConfig(
    max_steps=3, learning_rate=0.02, warmup_steps=0, per_device_train_batch_size=8, packing=False, logging_steps=1
)


def train_variant(
    quantized_dir: Path, prepared_dir: Path, cfg: LoraConfig, work: Path
) -> tuple[Path, dict, TrainingReport]:
    """A fresh adapter of `cfg` on the 4-bit base, trained `TRAINING`'s steps: (its folder, LoRA report, report)."""
    lora = hf.add_lora(quantized_dir, cfg, work / "adapter0")
    job = distributed.TrainJob(
        backend="hf",
        base_dir=str(quantized_dir),
        adapter_dir=str(work / "adapter0"),
        train_dir=str(prepared_dir / "train"),
        tokenizer_dir=str(prepared_dir / "tokenizer"),
        training=TRAINING,
        max_seq_length=128,
        out_dir=str(work / "adapter"),
    )
    report = distributed.train_adapter(job)
    return work / "adapter", lora, report


def merge_check(tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path, adapter: Path, work: Path) -> dict:
    config = RunConfig(model=ModelConfig(name=str(tiny_model_dir)), export=ExportConfig(merge_check_prompts=4))
    trained = TrainingReport(first_loss=2.0, final_loss=1.0, train_seconds=1.0, steps=3)
    inputs = release.ReleaseInputs(config, quantized_dir, adapter, prepared_dir, {}, trained, {})
    prompts = [p["prompt"] for p in PreparedData(str(prepared_dir)).eval_prompts()]
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer")
    _, check = release.merge_and_check(inputs, tokenizer, prompts, work / "merge")
    return check


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_and_its_merge_passes_the_check(
    variant: str, tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    cfg = VARIANTS[variant]
    adapter, lora, _ = train_variant(quantized_dir, prepared_dir, cfg, tmp_path)
    initial = lora_variants.read_config(tmp_path / "adapter0")
    saved = lora_variants.read_config(adapter)
    assert (saved["use_dora"], saved["use_rslora"]) == (cfg.use_dora, cfg.use_rslora)
    assert lora["init"] == str(lora_variants.init_weights(cfg.init)) == str(initial["init_lora_weights"])
    tensors = load_file(str(adapter / lora_variants.ADAPTER_WEIGHTS))
    before = load_file(str(tmp_path / "adapter0" / lora_variants.ADAPTER_WEIGHTS))
    if cfg.residual_init:
        # trained on the residual, saved as a plain LoRA of rank 2r on the unchanged base
        assert saved["init_lora_weights"] is True and saved["r"] == 2 * cfg.r
        assert all(t.shape[0] == 2 * cfg.r for k, t in tensors.items() if ".lora_A." in k)
    else:
        assert any(not torch.equal(t, before[k]) for k, t in tensors.items() if ".lora_B." in k), "B trained"
    if cfg.use_dora:
        assert any("lora_magnitude_vector" in k for k in tensors)
    if cfg.modules_to_save:
        # PEFT saves a module trained in full under its own name; tied, the input embedding is the output one
        full = [k for k in tensors if ".lora_" not in k]
        assert full and all(k.endswith(("lm_head.weight", "embed_tokens.weight")) for k in full), full
        assert any(not torch.equal(tensors[k].float(), before[k].float()) for k in full), "trained in full"

    check = merge_check(tiny_model_dir, quantized_dir, prepared_dir, adapter, tmp_path)
    assert check["merge_check_passed"], check["merge_check_failures"]
    assert check["merged_lora_modules"] == 2 * 7
    assert check["merged_dora_modules"] == (2 * 7 if cfg.use_dora else 0)
    assert (check["merged_saved_modules"] > 0) == bool(cfg.modules_to_save)


def test_merge_refuses_an_unconverted_pissa_adapter(quantized_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    """An adapter still expressed on the residual base would merge to the wrong weights: refused, saying why."""
    hf.add_lora(quantized_dir, VARIANTS["pissa"], tmp_path / "adapter0")
    with pytest.raises(merge.ExportError, match="never converted to a plain LoRA"):
        merge.merge_streaming(tiny_model_dir, tmp_path / "adapter0", tmp_path / "m", "bfloat16", "10GB")


def test_pissa_training_starts_from_the_base_model(quantized_dir: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """Residual base + initial adapter = the base, up to the 4-bit rounding of the residual."""
    hf.add_lora(quantized_dir, VARIANTS["pissa"], tmp_path / "adapter0")
    model = hf.load_trainable(quantized_dir, tmp_path / "adapter0", gradient_checkpointing=False).eval()
    base = hf.load_base(quantized_dir).eval()
    ids = torch.tensor([PreparedData(str(prepared_dir)).split(PreparedData.TRAIN)[0]["input_ids"][:32]])
    with torch.no_grad():
        start, plain = model(input_ids=ids).logits, base(input_ids=ids).logits
    with torch.no_grad(), model.disable_adapter():
        residual = model(input_ids=ids).logits
    gap = (start - plain).abs().max().item()
    assert gap < 0.25 * (residual - plain).abs().max().item(), "the adapter restores what the residual took out"


def test_unsloth_refuses_only_what_it_cannot_run() -> None:
    """The backend choice for Unsloth (which cannot run here): PiSSA's init and untrainable saved modules go to
    hf, with the reason; DoRA, rsLoRA, gaussian and OLoRA stay on Unsloth with its own arguments."""
    for name in ("dora", "rslora", "gaussian", "olora"):
        assert us.cannot_run(lora_variants.settings(VARIANTS[name]), "inject") == ""
    assert "pissa" in us.cannot_run(lora_variants.settings(VARIANTS["pissa"]), "inject")
    assert us.cannot_run(lora_variants.settings(VARIANTS["pissa"]), "train") == ""
    assert us.cannot_run({"modules_to_save": ["lm_head", "model.embed_tokens"]}, "train") == ""
    assert "score" in us.cannot_run({"modules_to_save": ["score"]}, "train")
    kwargs = us.lora_kwargs(VARIANTS["dora"])
    assert kwargs["use_dora"] is True and kwargs["init_lora_weights"] is True
    assert json.dumps(kwargs)  # plain values, as Unsloth's get_peft_model takes them
