"""Evaluation stops where the template ends an answer and scores the final answer (issue 18, item 3), shown with a
short CPU finetune of a fresh 2-layer Llama: on a Gemma-style template (EOS <eos>, answers end with <end_of_turn>)
greedy answers stop at <end_of_turn>; on a Qwen3-style template (answers trained after an empty think block) exact
match counts the final answer."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from llmtune.config import EvaluationConfig
from llmtune.data import Example, Turn, encode_examples
from llmtune.data.encode import prompt_for_last_answer
from llmtune.data.templates import end_of_turn_ids
from llmtune.demo import build_demo_tokenizer, make_demo_rows
from llmtune.evaluate.scoring import generate_answers, score
from tests.test_template_families import FAMILIES_DIR

LR = 3e-3
WORDS = {"1": "one", "2": "two", "3": "three", "4": "four"}
ROWS = [Example(turns=(Turn("user", f"Spell {n}."), Turn("assistant", word))) for n, word in WORDS.items()]


def family(base: Any, name: str, special: list[str], eos: str, plain: tuple[str, ...] = ()) -> Any:
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.add_tokens(list(plain))  # Qwen3's <think> tags are ordinary added tokens: decoding keeps them
    tok.eos_token = eos
    tok.chat_template = (FAMILIES_DIR / f"{name}.jinja").read_text()
    return tok


def finetuned(tok: Any, steps: int = 150) -> tuple[Any, Any]:
    """A fresh tiny Llama trained on ROWS until it answers them (full finetune, a few seconds on one CPU thread:
    ops this small run slower on several threads of a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _finetune(tok, steps)
    finally:
        torch.set_num_threads(threads)


def _finetune(tok: Any, steps: int) -> tuple[Any, Any]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    encoded = encode_examples(tok, ROWS, responses_only=True)
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in encoded])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e.input_ids) for e in encoded])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    rows = Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]})
    return model.eval(), rows


@pytest.fixture(scope="module")
def demo_tokenizer() -> Any:
    return build_demo_tokenizer(make_demo_rows(20, seed=0))


def test_generation_stops_at_gemmas_end_of_turn_not_only_at_eos(demo_tokenizer: Any) -> None:
    tok = family(demo_tokenizer, "gemma", ["<start_of_turn>", "<end_of_turn>", "<eos>"], "<eos>")
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == ["<end_of_turn>", "<eos>"]
    model, _ = finetuned(tok)
    prompts = [prompt_for_last_answer(tok, row)[0] for row in ROWS]
    assert generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=4) == list(WORDS.values())
    # stopping at EOS alone (as before) runs on past the answer's <end_of_turn> to the token limit
    batch = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
    new = tok.convert_ids_to_tokens(out[0, batch["input_ids"].shape[1] :].tolist())
    assert new.index("<end_of_turn>") < 3 and len(new) == 8


def test_qwen3_style_answers_are_scored_without_the_empty_think_block(demo_tokenizer: Any) -> None:
    tok = family(demo_tokenizer, "qwen3", [], "<|im_end|>", plain=("<think>", "</think>"))
    model, rows = finetuned(tok)
    torch.set_num_threads(1)  # generation too: restored by the next test's finetune
    prompts, references = zip(*(prompt_for_last_answer(tok, row) for row in ROWS), strict=True)
    final, answers = score(model, tok, rows, list(prompts), list(references), EvaluationConfig(metrics=[]))
    assert answers[0].startswith("<think>") and answers[0].endswith("</think>\n\none")  # the whole generation
    assert final["exact_match"] == 1.0
    whole, _ = score(model, tok, rows, list(prompts), list(references), EvaluationConfig(score_final_answer=False))
    assert whole["exact_match"] == 0.0
