"""Templating, masking, EOS and the prepared folder, on the tiny tokenizer and small fixture files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtune import data
from llmtune.config import DataConfig


@pytest.fixture()
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return data.configure_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir), None)


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    row = {"instruction": "Count the words.", "input": "cat dog", "output": "2"}
    ex = data.encode_example(tokenizer, row, train_on_responses_only=True)
    trained = [t for t in ex["labels"] if t != -100]
    assert ex["labels"][0] == -100 and trained, "prompt masked, answer trained"
    assert trained[-1] == tokenizer.eos_token_id, "EOS carries loss, so the model learns to stop"
    assert tokenizer.decode(trained, skip_special_tokens=True).strip() == "2"
    assert ex["input_ids"][-len(trained) :] == trained


def test_full_sequence_loss_when_switched_off(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = data.encode_example(tokenizer, {"instruction": "a", "output": "b"}, train_on_responses_only=False)
    assert ex["labels"] == ex["input_ids"]


def test_pad_token_is_distinct_from_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.pad_token = tokenizer.eos_token
    data.configure_tokenizer(tokenizer, None)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_prepare_writes_splits_prompts_tokenizer_and_stats(prepared_dir: Path, demo_rows: list) -> None:
    stats = json.loads((prepared_dir / "stats.json").read_text())
    train, evals = load_from_disk(str(prepared_dir / "train")), load_from_disk(str(prepared_dir / "eval"))
    assert stats["rows_in"] == len(demo_rows) == len(train) + len(evals) + sum(stats["dropped"].values())
    assert len(evals) == round(0.1 * stats["rows_kept"])
    prompts = (prepared_dir / "eval_prompts.jsonl").read_text().splitlines()
    assert len(prompts) == len(evals)
    assert json.loads(prompts[0])["prompt"].endswith("<|im_start|>assistant\n")
    assert AutoTokenizer.from_pretrained(prepared_dir / "tokenizer").chat_template
    assert len(stats["fingerprint"]) == 16


def test_too_long_rows_are_dropped_and_counted(tmp_path: Path, rows_file: Path, tiny_model_dir: Path) -> None:
    cfg = DataConfig(source=str(rows_file), max_seq_length=30)
    stats = data.prepare(cfg, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path)
    assert stats["dropped"]["too_long"] > 0
    assert stats["token_length"]["max"] <= 30


def test_fingerprint_changes_with_content() -> None:
    assert data.fingerprint([{"a": "1"}]) != data.fingerprint([{"a": "2"}])


def test_local_folder_in_hub_layout_loads_through_datasets(tmp_path: Path, demo_rows: list) -> None:
    # The Hub code path (datasets.load_dataset) on a local folder laid out like a Hub dataset repo.
    from llmtune.demo import write_jsonl

    write_jsonl(demo_rows[:20], tmp_path / "repo" / "data" / "train.jsonl")
    rows = data.load_rows(DataConfig(source=str(tmp_path / "repo"), split="train"))
    assert rows[:20] == demo_rows[:20]


def test_json_array_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert data.load_rows(DataConfig(source=str(path))) == [{"instruction": "a", "output": "b"}]
