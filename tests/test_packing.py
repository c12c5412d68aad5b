"""Padding-free packing: examples packed into one row with restarting position ids keep their own losses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def token_losses(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, **extra: Any) -> torch.Tensor:
    """Per-position next-token loss (0 where the label is masked), shape [seq_len - 1].

    use_cache=False as in training: transformers only derives the per-example (block-diagonal) mask from
    restarting position ids when no KV cache is in play.
    """
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **extra).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="none")


def per_example_means(losses: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> list[float]:
    means, start = [], 0
    for length in lengths:
        span = slice(start, start + length - 1)  # positions predicting tokens 1..length-1 of this example
        mask = labels[0, 1:][span] != -100
        means.append(float(losses[span][mask].mean()))
        start += length
    return means


def test_packed_examples_have_the_same_loss_as_unpacked(model: Any, prepared_dir: Path) -> None:
    examples = load_from_disk(str(prepared_dir / "train")).select(range(4)).to_list()
    lengths = [len(e["input_ids"]) for e in examples]
    unpacked = []
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        unpacked += per_example_means(token_losses(model, ids, labels), labels, [len(e["input_ids"])])

    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(lengths))
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    losses = token_losses(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    assert per_example_means(losses, packed["labels"], lengths) == pytest.approx(unpacked, abs=1e-4)

    # Control: the same row read as one sequence lets later examples see earlier ones, and losses change.
    leaked = token_losses(model, packed["input_ids"], packed["labels"])
    assert per_example_means(leaked, packed["labels"], lengths)[1:] != pytest.approx(unpacked[1:], abs=1e-3)


def test_training_with_packing_trains_fewer_fuller_rows(quantized_dir: Path, prepared_dir: Path) -> None:
    from transformers import AutoTokenizer

    from llmtune.config import LoraConfig, TrainingConfig
    from llmtune.model import hf
    from llmtune.train import sft

    adapter = hf.add_lora(quantized_dir, LoraConfig(r=4, alpha=8), prepared_dir / "lora-packing")
    assert adapter
    model = hf.load_trainable(quantized_dir, prepared_dir / "lora-packing", gradient_checkpointing=False)
    dataset = load_from_disk(str(prepared_dir / "train"))
    cfg = TrainingConfig(max_steps=3, packing=True, per_device_train_batch_size=2, logging_steps=1)
    report = sft.train(
        model, AutoTokenizer.from_pretrained(prepared_dir / "tokenizer"), dataset, cfg, prepared_dir / "work", 128
    )
    assert report["packing"] and report["rows_after_packing"] < report["train_rows"] / 2
    assert report["padding_free"]  # packed rows go to the model flattened, without padding
    assert all(p["loss"] > 0 for p in report["loss_history"])


def train_and_see_first_batch(
    quantized_dir: Path, prepared_dir: Path, tmp_path: Path, cfg: Any, dataset: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train `cfg` for its steps on the prepared rows (or `dataset`); the report and the first collated batch."""
    from transformers import AutoTokenizer, TrainerCallback

    from llmtune.config import LoraConfig
    from llmtune.model import hf
    from llmtune.train import sft

    hf.add_lora(quantized_dir, LoraConfig(r=4, alpha=8), tmp_path / "lora")
    model = hf.load_trainable(quantized_dir, tmp_path / "lora", gradient_checkpointing=False)
    seen: list[dict[str, Any]] = []

    class Batches(TrainerCallback):  # the collated batch of the first step, as the model receives it
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            loader = kwargs["train_dataloader"]
            seen.append(loader.collate_fn(loader.dataset.select(range(3)).to_list()))

    report = sft.train(
        model,
        AutoTokenizer.from_pretrained(prepared_dir / "tokenizer"),
        dataset if dataset is not None else load_from_disk(str(prepared_dir / "train")),
        cfg,
        tmp_path / "work",
        128,
        callbacks=[Batches()],
    )
    assert all(p["loss"] > 0 for p in report["loss_history"])
    return report, seen[0]


@pytest.mark.parametrize("padding_free", [None, True, False])
def test_padding_free_setting_reaches_the_trainers_batches(
    padding_free: bool | None, quantized_dir: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """Without packing, training.padding_free=true flattens each batch into one row with restarting position
    ids; null leaves the backend's choice (hf: padded batches)."""
    from llmtune.config import TrainingConfig

    cfg = TrainingConfig(
        max_steps=2, per_device_train_batch_size=3, logging_steps=1, packing=False, padding_free=padding_free
    )
    report, batch = train_and_see_first_batch(quantized_dir, prepared_dir, tmp_path, cfg)
    assert report["padding_free"] is bool(padding_free) and not report["packing"]
    if padding_free:
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert (batch["position_ids"][0] == 0).sum() == 3  # three examples, each starting at position 0
    else:
        assert batch["input_ids"].shape[0] == 3 and "attention_mask" in batch


def test_unset_packing_packs_mixed_lengths(quantized_dir: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """training.packing=null on instruction data of mixed lengths trains packed, flattened rows."""
    from llmtune.config import TrainingConfig

    cfg = TrainingConfig(max_steps=2, per_device_train_batch_size=3, logging_steps=1)
    report, batch = train_and_see_first_batch(quantized_dir, prepared_dir, tmp_path, cfg)
    assert report["packing"] and report["padding_free"]
    assert report["rows_after_packing"] < report["train_rows"] / 2
    assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"][0] == 0).sum() > 3  # 3 rows, many examples


def test_unset_packing_keeps_plain_rows_when_lengths_are_equal(
    quantized_dir: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """Pre-chunked data (every example as long) gains nothing from packing: plain rows, padding-free off."""
    from datasets import Dataset

    from llmtune.config import TrainingConfig

    rows = load_from_disk(str(prepared_dir / "train")).to_list()
    shortest = min(len(r["input_ids"]) for r in rows)
    chunked = Dataset.from_list([{k: r[k][:shortest] for k in ("input_ids", "labels")} for r in rows[:40]])
    cfg = TrainingConfig(max_steps=2, per_device_train_batch_size=3, logging_steps=1)
    report, batch = train_and_see_first_batch(quantized_dir, prepared_dir, tmp_path, cfg, dataset=chunked)
    assert report["packing"] is False and report["padding_free"] is False
    assert batch["input_ids"].shape == (3, shortest)
