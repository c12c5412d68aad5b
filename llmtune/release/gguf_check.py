"""The GGUF check: does each exported GGUF file compute what the merged 16-bit model computes, before it is published?

Like the merge check (`llmtune.release.check`), on the same eval prompts:
1. the file is read back by a real GGUF reader: transformers' GGUF loader (which uses the gguf package's
   GGUFReader and dequantizers) rebuilds a transformers model from the file's tensors and metadata. Its
   prompt logits must be within `export.gguf_check_atol[type]` of the merged model's (float32, plain
   transformers), and its greedy answers identical except where they part at a near tie, which the type's
   rounding may flip (counted).
2. the tokenizer inside the file must be the training tokenizer: the same tokens in the same order, the same
   end-of-turn (EOS) token, and the chat template used in training.

transformers' reader does not map two things llama.cpp reads: the key length of heads wider than
hidden / heads (Qwen3), and Llama-3 RoPE scaling, which GGUF carries as the `rope_freqs` tensor. The check
reads both from the file and gives them to the reader's config, after comparing `rope_freqs` with the
factors transformers computes for the merged model; a file without them would fail the logit comparison.

Example:
    >>> gguf_failures({"gguf_q8_0_max_logit_gap": 0.9, "gguf_q8_0_atol": 0.5, "gguf_q8_0_greedy_mismatches": 0,
    ...     "gguf_q8_0_tokenizer_matches": True, "gguf_q8_0_chat_template_matches": True}, "q8_0")
    ['q8_0: logits differ from the merged model by up to 0.9 (allowed 0.5)']
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune.config import ExportConfig
from llmtune.errors import LlmtuneError
from llmtune.release.check import PromptOutputs, compare, greedy_divergences, load_float32, prompt_outputs
from llmtune.release.gguf import llama3_rope_factors, read_metadata, rope_parameters


class GgufCheckFailed(LlmtuneError):
    """A GGUF file does not reproduce the merged model; it must not be published."""


def load_gguf(path: Path, merged_config: dict[str, Any]) -> Any:
    """The GGUF file as a float32 transformers model (weights dequantized), with the config facts transformers'
    reader does not map taken from the file itself (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    meta = read_metadata(path)
    arch = meta["general.architecture"]
    if f"{arch}.attention.key_length" in meta:
        config.head_dim = int(meta[f"{arch}.attention.key_length"])
    if rope_freqs_of(path) is not None:
        config.rope_parameters = verified_llama3_rope(path, merged_config)
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()


def rope_freqs_of(path: Path) -> Any:
    """The file's `rope_freqs` tensor (Llama-3 RoPE factors), or None."""
    import numpy as np
    from gguf import GGUFReader

    found = [t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight"]
    return np.array(found[0].data, dtype=np.float32) if found else None


def verified_llama3_rope(path: Path, merged_config: dict[str, Any]) -> dict[str, Any]:
    """The merged model's Llama-3 RoPE settings, once the file's `rope_freqs` are shown to encode them."""
    import torch

    want = llama3_rope_factors(merged_config)
    got = torch.as_tensor(rope_freqs_of(path))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5):
        raise GgufCheckFailed(
            f"GGUF check failed for {path.name}: its rope_freqs tensor does not encode the merged model's Llama-3 "
            "RoPE scaling, so llama.cpp would compute other positions than training did. Nothing is published."
        )
    return rope_parameters(merged_config)


def tokenizer_facts(path: Path, tokenizer: Any) -> dict[str, bool]:
    """Whether the file carries the training tokenizer (tokens in id order, EOS) and its chat template."""
    meta = read_metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = tokenizer.get_vocab()
    same_tokens = all(tokens[i] == token for token, i in vocab.items())
    return {
        "tokenizer_matches": same_tokens and meta.get("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id,
        "chat_template_matches": meta.get("tokenizer.chat_template") == tokenizer.chat_template,
    }


def _outputs(load: Callable[[], Any], tokenizer: Any, prompts: list[str], new_tokens: int) -> list[PromptOutputs]:
    model = load()
    try:
        return prompt_outputs(model, tokenizer, prompts, new_tokens)
    finally:
        del model
        gc.collect()


def check_gguf_files(
    files: dict[str, Path], merged_dir: Path, tokenizer: Any, prompts: list[str], cfg: ExportConfig
) -> dict[str, Any]:
    """The GGUF check of every file (`{type: path}`) against the merged model: fields `gguf_<type>_*`."""
    import json

    prompts, n = prompts[: cfg.merge_check_prompts], cfg.merge_check_max_new_tokens
    merged_config = json.loads((merged_dir / "config.json").read_text())
    want = _outputs(lambda: load_float32(merged_dir), tokenizer, prompts, n)
    result: dict[str, Any] = {"gguf_check_prompts": len(prompts), "gguf_reader": "transformers (gguf GGUFReader)"}
    failures = []
    for kind, path in files.items():
        got = _outputs(lambda path=path: load_gguf(path, merged_config), tokenizer, prompts, n)  # type: ignore[misc]
        atol = cfg.gguf_check_atol[kind]
        gap, same = compare(got, want)
        ties, mismatches = greedy_divergences(got, want, margin=atol)
        fields = {
            "atol": atol,
            "max_logit_gap": round(gap, 5),
            "greedy_identical": same == 1.0,
            "greedy_near_tie_flips": ties,
            "greedy_mismatches": mismatches,
            "bytes": path.stat().st_size,
            **tokenizer_facts(path, tokenizer),
        }
        result.update({f"gguf_{kind}_{k}": v for k, v in fields.items()})
        failures += gguf_failures(result, kind)
    result["gguf_check_failures"] = failures
    result["gguf_check_passed"] = not failures
    return result


def gguf_failures(result: dict[str, Any], kind: str) -> list[str]:
    """Why one type's file must not be published (empty when it may)."""
    field = lambda name: result[f"gguf_{kind}_{name}"]  # noqa: E731
    failures = []
    if field("max_logit_gap") > field("atol"):
        failures.append(
            f"{kind}: logits differ from the merged model by up to {field('max_logit_gap')} (allowed {field('atol')})"
        )
    if field("greedy_mismatches"):
        failures.append(
            f"{kind}: greedy answers differ from the merged model on {field('greedy_mismatches')} "
            "prompts, not at a near tie"
        )
    if not field("tokenizer_matches"):
        failures.append(f"{kind}: the file's tokens or EOS are not the training tokenizer's")
    if not field("chat_template_matches"):
        failures.append(f"{kind}: the file's chat template is not the training template")
    return failures


def ensure_passed(result: dict[str, Any]) -> None:
    """Raise GgufCheckFailed with the reasons when the check failed."""
    if not result["gguf_check_passed"]:
        raise GgufCheckFailed(
            "GGUF check failed, so nothing is exported or published: "
            + "; ".join(result["gguf_check_failures"])
            + ". Drop that type from export.gguf_types, or raise its export.gguf_check_atol if only its rounding "
            "is larger than allowed."
        )
