"""llmtune: QLoRA fine-tuning as plain functions, grouped by stage, with no ZenML import (steps/ wraps them).

Stages, in the order a run goes through them (a module only imports the ones above it):
- `config` (the typed run config), `errors` (the base of every error a user can fix), `artifacts` (what travels
  between steps, each kind the one place that knows its files);
- `data`: read, template, tokenize, mask and split instruction data;
- `model`: the backends (`hf`: transformers + bitsandbytes + PEFT; `unsloth`), 4-bit loading, LoRA, attention;
- `train`: supervised fine-tuning with TRL (`sft`), on one GPU or data-parallel (`distributed`), GPU memory;
- `evaluate`: base against tuned (`scoring`), answer metrics, an optional LLM judge;
- `release`: the promotion gate, merge, merge check, export formats, model card, publishing;
- `demo` and `preflight`: the offline demo's assets, and the checks the CLI runs before a pipeline.
"""
