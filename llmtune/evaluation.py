"""Base vs tuned on the same held-out rows: token-mean loss on response tokens, and exact match of greedy answers.

The base is the tuned model with its adapter switched off, so both see the same 4-bit weights,
the same template (from the prepared data's tokenizer) and the same masking.

Example:
    >>> exact_match(["four two", "fox"], ["four two ", "owl"])
    0.5
"""

from __future__ import annotations

import math
from typing import Any

from llmtune.config import EvaluationConfig


def eval_loss(model: Any, dataset: Any, pad_token_id: int, batch_size: int) -> float:
    """Mean cross-entropy over every labelled token of `dataset` (rows with input_ids and labels)."""
    import torch

    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = _pad_batch(dataset[start : start + batch_size], pad_token_id, model.device)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((labels != -100).sum())
    return total / max(count, 1)


def _pad_batch(columns: dict[str, list[list[int]]], pad_token_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids in columns["input_ids"])

    def pad(rows: list[list[int]], value: int) -> Any:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)

    input_ids = pad(columns["input_ids"], pad_token_id)
    mask = pad([[1] * len(r) for r in columns["input_ids"]], 0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": pad(columns["labels"], -100)}


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding, stopping at EOS."""
    import torch

    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after trimming whitespace."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)


def compare(
    model: Any, tokenizer: Any, eval_dataset: Any, eval_prompts: list[dict[str, str]], cfg: EvaluationConfig
) -> dict[str, Any]:
    """Metrics for base (adapter off) and tuned (adapter on), plus a few side-by-side samples."""
    rows = eval_dataset.select(range(min(len(eval_dataset), cfg.max_eval_rows or len(eval_dataset))))
    prompts = eval_prompts[: cfg.num_generation_prompts]
    results: dict[str, Any] = {}
    outputs: dict[str, list[str]] = {}
    for name in ("base", "tuned"):
        with _adapter(model, enabled=name == "tuned"):
            loss = eval_loss(model, rows, tokenizer.pad_token_id, cfg.batch_size)
            outputs[name] = generate_answers(
                model, tokenizer, [p["prompt"] for p in prompts], cfg.max_new_tokens, cfg.batch_size
            )
        results[f"{name}_eval_loss"] = round(loss, 4)
        results[f"{name}_perplexity"] = round(math.exp(min(loss, 50.0)), 3)
        results[f"{name}_exact_match"] = exact_match(outputs[name], [p["reference"] for p in prompts])
    results["eval_rows"], results["generation_prompts"] = len(rows), len(prompts)
    results["samples"] = [
        {"reference": p["reference"], "base": b, "tuned": t}
        for p, b, t in zip(prompts[:8], outputs["base"], outputs["tuned"], strict=False)
    ]
    return results


def _adapter(model: Any, enabled: bool) -> Any:
    from contextlib import nullcontext

    return nullcontext() if enabled else model.disable_adapter()
