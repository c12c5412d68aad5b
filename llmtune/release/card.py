"""The model card (README.md) written into every exported folder: what the model is, how it was made and
measured, and how to load it with plain transformers or PEFT.

It is rendered only from the facts below (config, reports, run ids), never from the environment, so
no token can reach it; `scrub_secrets` also removes anything shaped like a Hub token as a last guard.

Example:
    >>> facts = CardFacts(kind="adapter", base_model="org/base", base_revision=None, repo_id="me/tuned",
    ...     dataset="data/rows.jsonl", dataset_fingerprint="ab12", resolved_config="lora:\\n  r: 16\\n",
    ...     eval_report={"base_eval_loss": 2.0, "tuned_eval_loss": 1.0}, training_report={"train_seconds": 60.0},
    ...     hardware="CPU x2", merge_check={"merge_check_passed": True}, trail={"zenml_run": "finetune-1"})
    >>> card = render_model_card(facts)
    >>> "AutoPeftModelForCausalLM" in card, "ab12" in card, "| eval_loss | 2 | 1 |" in card
    (True, True, True)
    >>> scrub_secrets("token hf_abcdefghijklmnopqrstuvwxyz12 here")
    'token [redacted] here'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmtune.paths import looks_like_hub_id

HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
METRICS = ("eval_loss", "perplexity", "exact_match")
KIND_TITLES = {
    "adapter": "LoRA adapter (PEFT)",
    "merged_16bit": "merged 16-bit model",
    "merged_4bit": "merged model, 4-bit (bitsandbytes)",
    "gguf": "GGUF for llama.cpp and Ollama",
}


@dataclass(frozen=True)
class CardFacts:
    kind: str  # adapter, merged_16bit, merged_4bit or gguf
    base_model: str
    base_revision: str | None
    repo_id: str | None  # where it is published, for the loading snippet; None = a local folder
    dataset: str
    dataset_fingerprint: str
    resolved_config: str
    eval_report: dict[str, Any]
    training_report: dict[str, Any]
    hardware: str
    merge_check: dict[str, Any]
    trail: dict[str, str] = field(default_factory=dict)  # zenml_run, zenml_run_id, mlflow_run_id, ...
    gguf_check: dict[str, Any] = field(default_factory=dict)  # gguf_<type>_* fields, when GGUF was exported


def render_model_card(facts: CardFacts) -> str:
    """The README.md text for one exported folder."""
    sections = [
        _front_matter(facts),
        f"# {facts.repo_id or 'Fine-tuned model'}: {KIND_TITLES[facts.kind]}\n",
        _summary(facts),
        _metrics(facts.eval_report),
        _training(facts),
        _merge_check(facts.merge_check),
        _gguf_check(facts.gguf_check),
        _how_to_run_gguf(facts) if facts.kind == "gguf" else _how_to_load(facts),
        _trail(facts.trail),
        "## Resolved config\n\n```yaml\n" + facts.resolved_config.rstrip() + "\n```\n",
    ]
    return scrub_secrets("\n".join(sections))


def scrub_secrets(text: str) -> str:
    """Replace anything shaped like a Hugging Face token."""
    return HUB_TOKEN.sub("[redacted]", text)


def _front_matter(facts: CardFacts) -> str:
    """The card's YAML header; `datasets` lists the data only when it is one Hub dataset.

    >>> from dataclasses import replace
    >>> facts = CardFacts("adapter", "org/base", None, None, "org/data", "ab", "", {}, {}, "cpu", {})
    >>> ["datasets" in _front_matter(replace(facts, dataset=d)) for d in ("org/data", "/abs/data/rows.parquet",
    ...     "a.jsonl (weight 3.0) + org/b (weight 1.0)")]
    [True, False, False]
    """
    meta: dict[str, Any] = {
        "base_model": facts.base_model,
        "library_name": {"adapter": "peft", "gguf": "gguf"}.get(facts.kind, "transformers"),
        "tags": ["llmtune", "qlora", "lora", "sft", *(["gguf"] if facts.kind == "gguf" else [])],
    }
    # A Hub id has no spaces; several sources read "a.jsonl (weight 3.0) + owner/b (weight 1.0)" and are not listed.
    if looks_like_hub_id(facts.dataset) and " " not in facts.dataset:  # not a local path (absolute once loaded)
        meta["datasets"] = [facts.dataset]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _summary(facts: CardFacts) -> str:
    revision = f" (revision `{facts.base_revision}`)" if facts.base_revision else ""
    merged = {
        "adapter": "a LoRA adapter for the base model",
        "merged_16bit": "the adapter merged into the original 16-bit base weights",
        "merged_4bit": "the adapter merged into the 16-bit base, then quantized to 4-bit NF4",
        "gguf": "the adapter merged into the 16-bit base, written as GGUF for llama.cpp and Ollama",
    }[facts.kind]
    return (
        f"This is {merged}, trained with QLoRA (a 4-bit NF4 base, LoRA adapter trained with TRL's SFTTrainer) "
        f"by llmtune.\n\n"
        f"- Base model: `{facts.base_model}`{revision}\n"
        f"- Dataset: `{facts.dataset}`, fingerprint `{facts.dataset_fingerprint}` (hash of the rows used)\n"
    )


def _metrics(report: dict[str, Any]) -> str:
    rows = [
        f"| {m} | {report[f'base_{m}']:.4g} | {report[f'tuned_{m}']:.4g} |"
        for m in METRICS
        if f"base_{m}" in report and f"tuned_{m}" in report
    ]
    if not rows:
        return "## Evaluation\n\nNo evaluation report was recorded.\n"
    held_out = f" on {report['eval_rows']} held-out rows" if "eval_rows" in report else ""
    return (
        f"## Evaluation\n\nBase (adapter off) against tuned (adapter on), both on the 4-bit base{held_out}:\n\n"
        "| metric | base | tuned |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )


def _training(facts: CardFacts) -> str:
    report = facts.training_report
    items = [
        ("Training time", f"{report['train_seconds']:.0f} s" if "train_seconds" in report else None),
        ("Optimizer steps", report.get("steps")),
        (
            "Throughput",
            f"{report['approx_tokens_per_second']} tokens/s" if "approx_tokens_per_second" in report else None,
        ),
        ("Final training loss", report.get("final_loss")),
        ("Hardware", facts.hardware),
    ]
    return "## Training\n\n" + "".join(f"- {name}: {value}\n" for name, value in items if value is not None)


def _merge_check(check: dict[str, Any]) -> str:
    if not check:
        return ""
    lines = [
        f"- {key.removeprefix('merge_check_')}: {value}" for key, value in check.items() if not isinstance(value, list)
    ]
    return (
        "## Merge check\n\nThe merged model was compared with the 16-bit base + adapter (logits and greedy answers) "
        "before export; `vs_trained_nf4_*` compare it with the 4-bit base + adapter that was trained and evaluated "
        "(the gap is the base's quantization error).\n\n" + "\n".join(lines) + "\n"
    )


def gguf_kinds(check: dict[str, Any]) -> list[str]:
    """The GGUF types a check result covers, in its order.

    >>> gguf_kinds({"gguf_q8_0_max_logit_gap": 0.1, "gguf_f16_max_logit_gap": 0.0, "gguf_check_passed": True})
    ['q8_0', 'f16']
    """
    return [m.group(1) for k in check if (m := re.fullmatch(r"gguf_(.+)_max_logit_gap", k))]


def _gguf_check(check: dict[str, Any]) -> str:
    """A table of the GGUF check: per type, the logit gap against the merged model and the greedy answers."""
    kinds = gguf_kinds(check)
    if not kinds:
        return ""
    rows = [
        f"| {kind} | {check[f'gguf_{kind}_max_logit_gap']} | {check[f'gguf_{kind}_atol']} | "
        f"{check[f'gguf_{kind}_greedy_mismatches']} ({check[f'gguf_{kind}_greedy_near_tie_flips']} near-tie flips) | "
        f"{check[f'gguf_{kind}_tokenizer_matches'] and check[f'gguf_{kind}_chat_template_matches']} |"
        for kind in kinds
    ]
    return (
        "## GGUF check\n\nEach GGUF file was read back by a GGUF reader "
        f"({check.get('gguf_reader', 'transformers')}) and compared with the merged 16-bit model on "
        f"{check.get('gguf_check_prompts', '?')} eval prompts before export: prompt logits, greedy answers, and "
        "the tokenizer and chat template inside the file.\n\n"
        "| type | max logit gap | allowed | greedy answers differing | training tokenizer + template |\n"
        "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )


def _how_to_run_gguf(facts: CardFacts) -> str:
    kinds = gguf_kinds(facts.gguf_check) or ["q8_0"]
    first = f"model-{kinds[0]}.gguf"
    return (
        "## How to run\n\nThe GGUF file carries the training tokenizer and chat template.\n\n"
        "```bash\n"
        f"llama-cli -m {first} -cnv            # llama.cpp: chat with the template inside the file\n"
        f"llama-server -m {first} --jinja      # an OpenAI-compatible server on port 8080\n"
        "ollama create my-model -f Modelfile   # Ollama: the Modelfile in this folder points at the file\n"
        "ollama run my-model\n"
        "```\n"
    )


def _how_to_load(facts: CardFacts) -> str:
    where = facts.repo_id or "path/to/this/folder"
    if facts.kind == "adapter":
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")  # loads {facts.base_model} + adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
            "model = model.merge_and_unload()  # optional: a plain transformers model\n"
        )
    else:
        extra = "  # needs bitsandbytes" if facts.kind == "merged_4bit" else ""
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{where}"){extra}\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
        )
    code += (
        '\nmessages = [{"role": "user", "content": "Spell out the digits: 4 2"}]\n'
        "inputs = tokenizer.apply_chat_template(\n"
        "    messages, add_generation_prompt=True, return_tensors='pt', return_dict=True\n"
        ")\n"
        "answer = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        "print(tokenizer.decode(answer[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))\n"
    )
    return (
        "## How to load\n\nThe tokenizer in this folder carries the chat template used in training; "
        "prompt with `apply_chat_template`.\n\n```python\n" + code + "```\n"
    )


def _trail(trail: dict[str, str]) -> str:
    if not trail:
        return ""
    return "## Provenance\n\n" + "".join(f"- {key}: `{value}`\n" for key, value in trail.items() if value) + "\n"
