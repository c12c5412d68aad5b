"""Dataset preparation: read instruction rows, render them with the chat template, tokenize, mask, split.

The output is a folder that later steps load (see `PreparedData`): `train/` and `eval/` in
`datasets.save_to_disk` format with `input_ids` and `labels` (-100 on tokens without loss),
`eval_prompts.jsonl` (rendered prompts + references for generation metrics), `tokenizer/` (the one
template source used by training, evaluation and export) and `stats.json`.

Example:
    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> rows = make_demo_rows(20, seed=0)
    >>> ex = encode_example(build_demo_tokenizer(rows), rows[0], train_on_responses_only=True)
    >>> len(ex["input_ids"]) == len(ex["labels"]), ex["labels"][0]
    (True, -100)
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from llmtune.config import DataConfig
from llmtune.demo import CHATML_TEMPLATE

NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}
ALPACA_FIELDS = ("instruction", "output")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, row and field."""


def load_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Rows from a local JSONL/JSON file, a local dataset folder, or a Hub dataset id (same code path)."""
    path = Path(cfg.source)
    if path.is_file():
        return _read_json_rows(path)
    if path.exists() or looks_like_hub_id(cfg.source):
        return _load_with_datasets(cfg)
    raise DataError(
        f"Dataset source '{cfg.source}' is neither an existing file or folder nor a Hub dataset id "
        f"(owner/name). Set data.source to a JSONL/JSON file or a Hub id."
    )


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.endswith((".json", ".jsonl"))


def _load_with_datasets(cfg: DataConfig) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split, revision=cfg.revision)
    except Exception as err:  # the hub client raises many types; the user needs the source and the cause
        raise DataError(f"Could not load dataset '{cfg.source}' (split '{cfg.split}'): {err}") from None
    return [dict(row) for row in ds]


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}). Re-save the file as UTF-8.") from None
    if path.suffix == ".json":
        return _parse_json_array(path, text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: malformed JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def _parse_json_array(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}).") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a .json dataset must be an array of objects.")
    return data


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """An Alpaca row as chat messages; `where` names the row in errors."""
    for field in ALPACA_FIELDS:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' (alpaca rows need instruction, output; input optional).")
    for field in (*ALPACA_FIELDS, "input"):
        if field in row and row[field] is not None and not isinstance(row[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}.")
    prompt = row["instruction"].strip()
    if (row.get("input") or "").strip():
        prompt += "\n\n" + row["input"].strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"].strip()}]


def configure_tokenizer(tokenizer: Any, template_name: str | None) -> Any:
    """Set the chat template and a pad token distinct from EOS (so EOS is never treated as padding)."""
    if template_name:
        tokenizer.chat_template = NAMED_TEMPLATES[template_name]
    elif not tokenizer.chat_template:
        raise DataError("The tokenizer has no chat template. Set data.chat_template (e.g. chatml).")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [
            t
            for t in ("<|finetune_right_pad_id|>", "<pad>", tokenizer.unk_token)
            if t and t in tokenizer.get_vocab() and t != tokenizer.eos_token
        ]
        if candidates:
            tokenizer.pad_token = candidates[0]
    return tokenizer


def encode_example(
    tokenizer: Any, row: dict[str, Any], train_on_responses_only: bool, where: str = "row"
) -> dict[str, list[int]]:
    """Token ids and labels for one row; prompt tokens get -100 when training on responses only."""
    messages = to_messages(row, where)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            "The chat template renders the prompt differently with and without the answer; "
            "choose another data.chat_template."
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = _answer_ids(tokenizer, full[len(prompt) :])
    labels = ([-100] * len(prompt_ids) if train_on_responses_only else list(prompt_ids)) + answer_ids
    return {"input_ids": prompt_ids + answer_ids, "labels": labels}


def _answer_ids(tokenizer: Any, text: str) -> list[int]:
    # End the answer at its EOS so the model learns to stop; the template's trailing newline carries no signal.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in ids:
        return ids[: len(ids) - ids[::-1].index(eos)]
    return [*ids, eos]


def prepare(cfg: DataConfig, tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    """Load, encode, filter and split; write the prepared folder; return its stats."""
    from datasets import Dataset

    rows = load_rows(cfg)
    if not rows:
        raise DataError(f"Dataset '{cfg.source}' has no rows.")
    rows = _subsample(rows, cfg.max_rows, cfg.seed)
    configure_tokenizer(tokenizer, cfg.chat_template)
    encoded, dropped = _encode_all(tokenizer, rows, cfg)
    if len(encoded) < 2:
        raise DataError(
            f"Only {len(encoded)} usable rows in '{cfg.source}' after filtering ({dict(dropped)}); "
            f"need at least 2 for a train/eval split."
        )
    train_idx, eval_idx = _split(len(encoded), cfg.eval_fraction, cfg.seed)
    out = Path(out_dir)
    Dataset.from_list([encoded[i][0] for i in train_idx]).save_to_disk(str(out / "train"))
    Dataset.from_list([encoded[i][0] for i in eval_idx]).save_to_disk(str(out / "eval"))
    _write_eval_prompts(tokenizer, [encoded[i][1] for i in eval_idx], out / "eval_prompts.jsonl")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    stats = _stats(rows, encoded, dropped, len(train_idx), len(eval_idx))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _subsample(rows: list[dict[str, Any]], max_rows: int | None, seed: int) -> list[dict[str, Any]]:
    if max_rows is None or len(rows) <= max_rows:
        return rows
    return random.Random(seed).sample(rows, max_rows)


def _encode_all(tokenizer: Any, rows: list[dict[str, Any]], cfg: DataConfig) -> tuple[list, Counter]:
    encoded: list[tuple[dict, dict]] = []
    dropped: Counter[str] = Counter()
    for number, row in enumerate(rows, start=1):
        where = f"{cfg.source}, row {number}"
        if not str(row.get("output") or "").strip():
            dropped["empty_output"] += 1
            continue
        ex = encode_example(tokenizer, row, cfg.train_on_responses_only, where)
        if len(ex["input_ids"]) > cfg.max_seq_length:
            dropped["too_long"] += 1
        elif all(label == -100 for label in ex["labels"]):
            dropped["all_labels_masked"] += 1
        else:
            encoded.append((ex, row))
    return encoded, dropped


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(n * fraction)), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _write_eval_prompts(tokenizer: Any, rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            messages = to_messages(row, "eval row")
            prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
            f.write(json.dumps({"prompt": prompt, "reference": messages[1]["content"]}) + "\n")


def read_eval_prompts(prepared_dir: str | Path) -> list[dict[str, str]]:
    """The rendered eval prompts with their references, as written by `prepare`."""
    lines = (Path(prepared_dir) / "eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _stats(rows: list, encoded: list, dropped: Counter, n_train: int, n_eval: int) -> dict[str, Any]:
    lengths = sorted(len(ex["input_ids"]) for ex, _ in encoded)
    pct = {f"p{p}": lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (50, 90, 99)}
    return {
        "rows_in": len(rows),
        "rows_kept": len(encoded),
        "dropped": dict(dropped),
        "train_rows": n_train,
        "eval_rows": n_eval,
        "token_length": {**pct, "max": lengths[-1]},
        "fingerprint": fingerprint(rows),
    }


def fingerprint(rows: list[dict[str, Any]]) -> str:
    """A short content hash of the rows, so runs on different data are told apart."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]
