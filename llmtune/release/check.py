"""The merge check: does the merged model compute what base + adapter computed, before anything is published?

Two parts:

1. the gate: the merged model (loaded from disk with plain transformers) against the 16-bit base +
   adapter through PEFT, on eval prompts. Both compute the same function, so the logits may differ
   only by the rounding of the merged weights to `export.dtype`: `merge_check_atol` (0.25 for
   bfloat16 on the demo model) bounds that. The greedy answers must be identical, except where they
   first part at a near tie (the reference scored both tokens within `merge_check_atol`), which that
   same rounding may flip; such flips are counted in the result. The adapter must also move the logits
   by more than the tolerance, or the merge could not be told apart from the base.
2. a report, not a gate: the merged model against the NF4 base + adapter (the model that was trained
   and evaluated): its largest logit gap and the share of greedy answers that agree. This is the
   quantization gap; it is larger than the gate's tolerance and says how far the published model is
   from the evaluated one.

Example:
    >>> max_logit_gap([[0.0, 1.0]], [[0.0, 1.25]])
    0.25
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune import progress
from llmtune.config import ExportConfig
from llmtune.errors import LlmtuneError
from llmtune.model import hf


class MergeCheckFailed(LlmtuneError):
    """The merged model does not reproduce base+adapter; it must not be published."""


def load_float32(model_dir: str | Path) -> Any:
    """A saved model folder in float32 with plain transformers, in eval mode: how every side of the check loads."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, use_safetensors=True, device_map=hf.device_map()
    ).eval()


@dataclass
class PromptOutputs:
    logits: Any  # float32 logits over the prompt, on the CPU
    greedy: list[int]  # greedy continuation token ids
    step_scores: Any  # float32 (steps, vocab): the scores each greedy token was chosen from


def max_logit_gap(a: Any, b: Any) -> float:
    """Largest absolute difference between two logit arrays of the same shape."""
    import torch

    return float((torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max())


def prompt_outputs(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, desc: str | None = None
) -> list[PromptOutputs]:
    """Prompt logits and the greedy continuation of each prompt, with the scores behind each choice; with `desc`,
    a progress bar of the prompts done."""
    import torch

    results = []
    device = next(model.parameters()).device
    for prompt in progress.bar(
        total=len(prompts), desc=desc or "", unit="prompt", disable=desc is None, iterable=prompts
    ):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            logits = model(**ids).logits.float().cpu()[0]
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        greedy = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
        results.append(PromptOutputs(logits, greedy, torch.stack([s[0].float().cpu() for s in out.scores])))
    return results


def compare(got: list[PromptOutputs], want: list[PromptOutputs]) -> tuple[float, float]:
    """(largest prompt-logit gap, share of prompts with identical greedy continuations)."""
    gap = max(max_logit_gap(g.logits, w.logits) for g, w in zip(got, want, strict=True))
    same = sum(g.greedy == w.greedy for g, w in zip(got, want, strict=True)) / len(want)
    return gap, same


def near_tie_divergence(got: PromptOutputs, want: PromptOutputs, margin: float) -> bool:
    """Whether two greedy continuations first part where the reference scored both tokens within `margin`:
    a near tie, which rounding the weights to 16 bits may flip. Identical continuations are not a divergence.

    >>> import torch
    >>> want = PromptOutputs(None, [5, 1], torch.tensor([[0.0] * 5 + [2.0, 1.99], [0.0] * 7]))
    >>> near_tie_divergence(PromptOutputs(None, [6, 2], None), want, margin=0.05)
    True
    >>> near_tie_divergence(PromptOutputs(None, [0, 2], None), want, margin=0.05)
    False
    """
    step = next((i for i, (a, b) in enumerate(zip(got.greedy, want.greedy, strict=False)) if a != b), None)
    if step is None:
        return False
    scores = want.step_scores[step]
    return float(scores[want.greedy[step]] - scores[got.greedy[step]]) <= margin


def greedy_divergences(got: list[PromptOutputs], want: list[PromptOutputs], margin: float) -> tuple[int, int]:
    """(prompts whose greedy answers differ at a near tie, prompts whose answers differ otherwise)."""
    differ = [(g, w) for g, w in zip(got, want, strict=True) if g.greedy != w.greedy]
    ties = sum(near_tie_divergence(g, w, margin) for g, w in differ)
    return ties, len(differ) - ties


def _free(model: Any) -> None:
    del model
    gc.collect()


def _outputs_of(
    load: Callable[[], Any], tokenizer: Any, prompts: list[str], new_tokens: int, desc: str | None = None
) -> list[PromptOutputs]:
    """Load a model, run the prompts, let the model go: the check holds one model at a time."""
    model = load()
    try:
        return prompt_outputs(model, tokenizer, prompts, new_tokens, desc=desc)
    finally:
        _free(model)


def reference_outputs(
    base_dir: Path, adapter_dir: Path, tokenizer: Any, prompts: list[str], new_tokens: int
) -> tuple[list[PromptOutputs], list[PromptOutputs]]:
    """(16-bit base + adapter, 16-bit base alone) through PEFT, in float32."""
    from peft import PeftModel

    hf.require_adapter_safetensors(adapter_dir)
    model = PeftModel.from_pretrained(load_float32(base_dir), str(adapter_dir)).eval()
    with_adapter = prompt_outputs(model, tokenizer, prompts, new_tokens, desc="merge check: base + adapter")
    with model.disable_adapter():
        base_alone = prompt_outputs(model, tokenizer, prompts, new_tokens, desc="merge check: base alone")
    _free(model)
    return with_adapter, base_alone


@dataclass(frozen=True)
class CheckInputs:
    base_dir: Path  # original 16-bit base
    adapter_dir: Path
    quantized_dir: Path | None  # the NF4 base the adapter was trained on (for the quantization-gap report)
    tokenizer: Any
    prompts: list[str]


def check_merge(merged_dir: str | Path, inputs: CheckInputs, cfg: ExportConfig) -> dict[str, Any]:
    """The merge check (see the module docstring): gate fields plus the quantization-gap report."""
    prompts, n = inputs.prompts[: cfg.merge_check_prompts], cfg.merge_check_max_new_tokens
    want, base_alone = reference_outputs(inputs.base_dir, inputs.adapter_dir, inputs.tokenizer, prompts, n)
    got = _outputs_of(lambda: load_float32(merged_dir), inputs.tokenizer, prompts, n, desc="merge check: merged")
    gap, same = compare(got, want)
    effect, _ = compare(base_alone, want)
    ties, mismatches = greedy_divergences(got, want, margin=cfg.merge_check_atol)
    result: dict[str, Any] = {
        "merge_check_prompts": len(prompts),
        "merge_check_atol": cfg.merge_check_atol,
        "merge_check_max_logit_gap": round(gap, 5),
        "merge_check_greedy_identical": same == 1.0,
        "merge_check_greedy_near_tie_flips": ties,
        "merge_check_greedy_mismatches": mismatches,
        "merge_check_adapter_effect": round(effect, 5),
    }
    if inputs.quantized_dir is not None:
        result.update(_quantization_gap(got, inputs, prompts, n))
    result["merge_check_failures"] = merge_check_failures(result)
    result["merge_check_passed"] = not result["merge_check_failures"]
    return result


def _quantization_gap(got: list[PromptOutputs], inputs: CheckInputs, prompts: list[str], n: int) -> dict[str, Any]:
    assert inputs.quantized_dir is not None
    quantized_dir = inputs.quantized_dir
    trained = _outputs_of(
        lambda: hf.load_for_inference(quantized_dir, inputs.adapter_dir), inputs.tokenizer, prompts, n
    )
    gap, same = compare(got, trained)
    return {"vs_trained_nf4_max_logit_gap": round(gap, 5), "vs_trained_nf4_greedy_agreement": round(same, 4)}


def merge_check_failures(result: dict[str, Any]) -> list[str]:
    """Why a merge check result must not be published (empty when it may).

    >>> merge_check_failures({"merge_check_max_logit_gap": 0.1, "merge_check_atol": 0.25,
    ...     "merge_check_greedy_identical": True, "merge_check_adapter_effect": 0.1})
    ['the adapter moves the logits by 0.1 only, not more than the tolerance 0.25: ...']
    """
    atol = result["merge_check_atol"]
    failures = []
    if result["merge_check_max_logit_gap"] > atol:
        failures.append(
            f"merged vs base+adapter logits differ by up to {result['merge_check_max_logit_gap']} (allowed {atol})"
        )
    if result.get("merge_check_greedy_mismatches", 0):
        failures.append(
            f"greedy answers of the merged model differ from base+adapter on {result['merge_check_greedy_mismatches']}"
            f" prompts, not at a near tie"
        )
    if result["merge_check_adapter_effect"] <= atol:
        failures.append(
            f"the adapter moves the logits by {result['merge_check_adapter_effect']} only, not more than the "
            f"tolerance {atol}: the merge cannot be told apart from the base"
        )
    return failures


def ensure_passed(result: dict[str, Any]) -> None:
    """Raise MergeCheckFailed with the reasons when the check failed."""
    if not result["merge_check_passed"]:
        raise MergeCheckFailed(
            "Merge check failed, so nothing is exported or published: "
            + "; ".join(result["merge_check_failures"])
            + ". Check that the adapter matches model.name, or raise export.merge_check_atol if only rounding differs."
        )
