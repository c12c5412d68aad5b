"""Base vs tuned on the same held-out rows: loss and perplexity on response tokens, and generation metrics.

The base is the tuned model with its adapter switched off, so both see the same 4-bit weights,
the same template (from the prepared data's tokenizer) and the same masking. Answers are greedy,
batched with left padding and the KV cache, prompts sorted by length so a batch pads little, and stop at
every end-of-turn token of the template (`llmtune.data.templates.end_of_turn_ids`: Gemma's <end_of_turn>
ends an answer, not only EOS). With `evaluation.score_final_answer` a reasoning block (<think>...</think>)
is scored apart: the metrics see the final answer, the samples table keeps the reasoning. The
metrics chosen in `evaluation.metrics` (see `llmtune.evaluate.metrics`) score each answer; exact match is
always reported. The result is an `EvalReport`: a dict of metrics plus `samples`, one row per
generation prompt (instruction, reference, base and tuned answer, per-sample scores, rendered prompt).

Example:
    >>> report = EvalReport(samples=[{"instruction": "2+2?", "reference": "4", "base": "5", "tuned": "4"}])
    >>> sample_columns(report)["tuned"]
    ['4']
    >>> "<td class='text'>2+2?</td>" in samples_html(report)
    True
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmtune import progress
from llmtune.artifacts import EvalReport
from llmtune.config import EvaluationConfig
from llmtune.data.templates import end_of_turn_ids
from llmtune.evaluate import metrics as metric_lib

SAMPLE_TEXT_COLUMNS = ("instruction", "reference", "base", "tuned")
RENDERED_PROMPT = "prompt"  # the last column: the prompt as the model saw it, template markup included
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # the reasoning block of Qwen3, DeepSeek-R1 and QwQ


def eval_loss(model: Any, dataset: Any, pad_token_id: int, batch_size: int, desc: str | None = None) -> float:
    """Mean cross-entropy over every labelled token of `dataset` (rows with input_ids and labels); with `desc`,
    a progress bar of the rows done."""
    import torch

    total, count = 0.0, 0
    shown = progress.bar(total=len(dataset), desc=desc or "", unit="row", disable=desc is None)
    for start in range(0, len(dataset), batch_size):
        shown.update(min(batch_size, len(dataset) - start))
        batch = _pad_batch(dataset[start : start + batch_size], pad_token_id, model.device)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((labels != -100).sum())
    shown.close()
    return total / max(count, 1)


def _pad_batch(columns: dict[str, list[list[int]]], pad_token_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids in columns["input_ids"])

    def pad(rows: list[list[int]], value: int) -> Any:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)

    input_ids = pad(columns["input_ids"], pad_token_id)
    mask = pad([[1] * len(r) for r in columns["input_ids"]], 0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": pad(columns["labels"], -100)}


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    use_cache: bool = True,
    desc: str | None = None,
) -> list[str]:
    """Greedy answers in the order of `prompts`: batched with left padding and the KV cache, each stopping at the
    first end-of-turn token of the template (or EOS); with `desc`, a progress bar of the prompts answered."""
    tokenizer.padding_side = "left"  # new tokens then start at the same column for every row of a batch
    order = length_order(tokenizer, prompts)
    answers: dict[int, str] = {}
    shown = progress.bar(total=len(prompts), desc=desc or "", unit="prompt", disable=desc is None)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch_answers = _generate_batch(model, tokenizer, [prompts[i] for i in indices], max_new_tokens, use_cache)
        answers.update(zip(indices, batch_answers, strict=True))
        shown.update(len(indices))
    shown.close()
    return [answers[i] for i in range(len(prompts))]


def length_order(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Prompt indices, longest first, so each batch holds prompts of similar length (less padding)."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def _generate_batch(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, use_cache: bool) -> list[str]:
    import torch

    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def compare(
    model: Any,
    tokenizer: Any,
    eval_dataset: Any,
    eval_prompts: list[dict[str, str]],
    cfg: EvaluationConfig,
    champion_adapter: str | None = None,
) -> EvalReport:
    """Metrics for base (adapter off) and tuned (adapter on), and the samples table.

    With `champion_adapter` (the production version's adapter folder, trained on the same base) it is
    scored on the same rows and prompts as `champion_*`, so the promotion gate compares like with like.
    """
    rows = eval_dataset.select(range(min(len(eval_dataset), cfg.max_eval_rows or len(eval_dataset))))
    prompts = eval_prompts[: cfg.num_generation_prompts]
    texts, references = [p["prompt"] for p in prompts], [p["reference"] for p in prompts]
    instructions = [p.get("instruction", p["prompt"]) for p in prompts]  # data prepared before it was kept
    chosen = report_metrics(cfg)
    report = EvalReport()
    outputs: dict[str, list[str]] = {}
    for name in ("base", "tuned"):
        with _adapter(model, enabled=name == "tuned"):
            scores, outputs[name] = score(model, tokenizer, rows, texts, references, cfg, label=name)
        report.update({f"{name}_{k}": v for k, v in scores.items()})
    report["eval_rows"], report["generation_prompts"] = len(rows), len(prompts)
    report["metrics"] = chosen
    final = {name: [scored_answer(a, cfg) for a in answers] for name, answers in outputs.items()}
    report["samples"] = build_samples(instructions, references, final["base"], final["tuned"], chosen)
    if champion_adapter:
        with _other_adapter(model, champion_adapter, "champion"):
            scores, outputs["champion"] = score(model, tokenizer, rows, texts, references, cfg, label="production")
        report.update({f"champion_{k}": v for k, v in scores.items()})
        report["samples"] = [
            {**{k: row[k] for k in SAMPLE_TEXT_COLUMNS}, "champion": scored_answer(answer, cfg), **row}
            for row, answer in zip(report["samples"], outputs["champion"], strict=True)
        ]
    samples = with_reasoning(report["samples"], outputs, cfg)
    report["samples"] = [{**row, RENDERED_PROMPT: text} for row, text in zip(samples, texts, strict=True)]
    return report


def with_reasoning(
    samples: list[dict[str, Any]], outputs: dict[str, list[str]], cfg: EvaluationConfig
) -> list[dict[str, Any]]:
    """The samples with `<name>_reasoning` columns when final answers were scored and some output reasoned.

    >>> cfg = EvaluationConfig()
    >>> with_reasoning([{"tuned": "four"}], {"tuned": ["<think>f-o-u-r</think>four"]}, cfg)
    [{'tuned': 'four', 'tuned_reasoning': 'f-o-u-r'}]
    """
    if not cfg.score_final_answer or not any(THINK_CLOSE in a for answers in outputs.values() for a in answers):
        return samples
    return [
        {**row, **{f"{name}_reasoning": split_reasoning(answers[i])[0] for name, answers in outputs.items()}}
        for i, row in enumerate(samples)
    ]


def score(
    model: Any,
    tokenizer: Any,
    rows: Any,
    texts: list[str],
    references: list[str],
    cfg: EvaluationConfig,
    label: str | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Loss, perplexity and the configured generation metrics of `model` as it is now, with its greedy answers;
    with a `label` (base, tuned, production), progress bars of the rows and prompts done."""
    desc = f"evaluate {label}" if label else None
    loss = eval_loss(model, rows, tokenizer.pad_token_id, cfg.batch_size, desc=desc and f"{desc}: loss")
    answers = generate_answers(
        model, tokenizer, texts, cfg.max_new_tokens, cfg.batch_size, desc=desc and f"{desc}: answers"
    )
    scores = {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50.0)), 3)}
    scored = [scored_answer(answer, cfg) for answer in answers]
    scores.update(metric_lib.corpus_scores(scored, references, report_metrics(cfg)))
    return scores, answers


def split_reasoning(answer: str) -> tuple[str, str]:
    """(reasoning, final answer) of a generation that opens with a <think> block; ('', answer) without one.

    A generation that only closes one (the prompt opened it, as DeepSeek-R1's template does) splits at the
    closing tag.

    >>> split_reasoning("<think>\\n\\n</think>\\n\\nfour")
    ('', 'four')
    >>> split_reasoning("4 is f-o-u-r</think> four")
    ('4 is f-o-u-r', 'four')
    >>> split_reasoning("four")
    ('', 'four')
    """
    opened = answer.lstrip()
    if opened.startswith(THINK_OPEN):
        opened = opened[len(THINK_OPEN) :]
    elif THINK_CLOSE not in answer:
        return "", answer.strip()
    reasoning, closed, final = opened.partition(THINK_CLOSE)
    return (reasoning.strip(), final.strip()) if closed else (reasoning.strip(), "")


def scored_answer(answer: str, cfg: EvaluationConfig) -> str:
    """What the metrics compare with the reference: the final answer with `score_final_answer`, else all of it."""
    return split_reasoning(answer)[1] if cfg.score_final_answer else answer


def report_metrics(cfg: EvaluationConfig) -> list[str]:
    """The configured generation metrics, exact match always first (the run summary and model card show it)."""
    return ["exact_match", *(m for m in cfg.metrics if m != "exact_match")]


def build_samples(
    instructions: list[str], references: list[str], base: list[str], tuned: list[str], metrics: list[str]
) -> list[dict[str, Any]]:
    """One row per prompt: the instruction (no template markup), the texts side by side, then base_<metric> and
    tuned_<metric> per sample.

    >>> row = build_samples(["q"], ["a b"], ["a"], ["a b"], ["exact_match"])[0]
    >>> row["base"], row["base_exact_match"], row["tuned_exact_match"]
    ('a', 0.0, 1.0)
    """
    samples = []
    for instruction, reference, base_answer, tuned_answer in zip(instructions, references, base, tuned, strict=True):
        row: dict[str, Any] = {"instruction": instruction, "reference": reference, "base": base_answer}
        row["tuned"] = tuned_answer
        for name, answer in (("base", base_answer), ("tuned", tuned_answer)):
            row.update({f"{name}_{k}": v for k, v in metric_lib.sample_scores(answer, reference, metrics).items()})
        samples.append(row)
    return samples


def sample_columns(report: dict[str, Any]) -> dict[str, list[Any]]:
    """The samples as columns (for `mlflow.log_table`); every row has the same keys, the rendered prompt last."""
    samples = report.get("samples") or []
    keys = list(samples[0]) if samples else list(SAMPLE_TEXT_COLUMNS)
    keys = [k for k in keys if k != RENDERED_PROMPT] + [k for k in keys if k == RENDERED_PROMPT]
    return {key: [row.get(key) for row in samples] for key in keys}


# The page is shown in frames of fixed size (the ZenML dashboard's visualization panel, MLflow's artifact
# viewer): the samples table scrolls inside its own box with the header row kept in view, text columns get a
# readable width and wrap, score columns stay narrow, and the long rendered prompt is folded.
SAMPLES_CSS = (
    "body{font:13px sans-serif;margin:8px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}"
    ".scroll{overflow:auto;max-height:80vh;max-width:100%}.scroll th{position:sticky;top:0;background:#f4f4f4}"
    "td.text{min-width:12em;max-width:28em;white-space:pre-wrap;overflow-wrap:anywhere}"
    "td.num{white-space:nowrap;text-align:right}summary{cursor:pointer;color:#555}"
)


def samples_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: the metrics of base and tuned, then the samples table."""
    columns = sample_columns(report)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in columns)
    body = "".join(
        "<tr>" + "".join(_sample_cell(k, columns[k][i]) for k in columns) + "</tr>"
        for i in range(len(next(iter(columns.values()), [])))
    )
    summary = "".join(
        f"<tr><td>{html.escape(k.removeprefix('base_'))}</td><td class='num'>{_cell(v)}</td>"
        f"<td class='num'>{_cell(report.get('tuned_' + k.removeprefix('base_')))}</td></tr>"
        for k, v in report.items()
        if k.startswith("base_")
    )
    return (
        f"<html><head><meta charset='utf-8'><style>{SAMPLES_CSS}</style></head><body>"
        f"<h3>Base vs tuned</h3><table><tr><th>metric</th><th>base</th><th>tuned</th></tr>{summary}</table>"
        f"<h3>Samples</h3><div class='scroll'><table><tr>{head}</tr>{body}</table></div></body></html>"
    )


def _sample_cell(column: str, value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<td class='num'>{_cell(value)}</td>"
    if column == RENDERED_PROMPT:
        return f"<td class='text'><details><summary>rendered prompt</summary>{_cell(value)}</details></td>"
    return f"<td class='text'>{_cell(value)}</td>"


def _cell(value: Any) -> str:
    return html.escape(f"{value:.4g}" if isinstance(value, float) else str(value))


def _adapter(model: Any, enabled: bool) -> Any:
    from contextlib import nullcontext

    return nullcontext() if enabled else model.disable_adapter()


@contextmanager
def _other_adapter(model: Any, adapter_dir: str, name: str) -> Iterator[None]:
    """Load a second PEFT adapter beside the tuned one, make it the active one, and drop it afterwards."""
    from llmtune.model.hf import require_adapter_safetensors

    require_adapter_safetensors(adapter_dir)  # PEFT's load_adapter would fall back to unpickling a .bin
    previous = model.active_adapter
    model.load_adapter(adapter_dir, adapter_name=name)
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=True)
        model.delete_adapter(name)
