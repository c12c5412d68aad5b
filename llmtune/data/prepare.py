"""The whole preparation: read, convert, clean, encode, filter by length, split, write the prepared folder.

The folder (see `PreparedData`) has `train/` and `eval/` in `datasets.save_to_disk` format with
`input_ids` and `labels` (-100 where no loss), `eval_prompts.jsonl` (rendered prompts and references
for generation metrics), `tokenizer/` (the template every later stage uses), `stats.json` and
`report.html` (what preparation did, with a token-length histogram).
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.config import DataConfig
from llmtune.data import report
from llmtune.data.encode import Encoded, encode_examples, prompt_for_last_answer
from llmtune.data.errors import DataError, ErrorLog
from llmtune.data.formats import Example, detect_format, to_example
from llmtune.data.sources import Record, read_records
from llmtune.data.templates import configure_tokenizer


@dataclass
class Tally:
    """Rows in, and rows dropped by reason, through every stage."""

    rows_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0


def load_examples(cfg: DataConfig, errors: ErrorLog, split: str | None = None) -> tuple[list[Example], str, int]:
    """Read `cfg.source` (or an eval split/file) and convert every row: (examples, format, rows read)."""
    source, split = _where_to_read(cfg, split)
    records = read_records(source, split, errors, subset=cfg.subset, revision=cfg.revision)
    rows_read = len(records) + errors.count
    if not records:
        raise DataError(f"Dataset '{source}' (split '{split}') has no usable rows." + _first_errors(errors))
    fmt = cfg.format if cfg.format != "auto" else _detect(records[0], cfg)
    examples = [e for e in (_convert(r, fmt, cfg, errors) for r in records) if e is not None]
    return examples, fmt, rows_read


def _detect(record: Record, cfg: DataConfig) -> str:
    try:
        return detect_format(record.row, cfg.columns)
    except DataError as err:
        raise DataError(f"{record.where}: {err}") from None


def _where_to_read(cfg: DataConfig, split: str | None) -> tuple[str, str]:
    if split is None:
        return cfg.source, cfg.split
    if Path(split).exists():  # data.eval_split may name a separate file or folder
        return split, "train"
    return cfg.source, split


def _convert(record: Record, fmt: str, cfg: DataConfig, errors: ErrorLog) -> Example | None:
    try:
        return to_example(record.row, fmt, record.where, cfg.columns, cfg.role_map)
    except DataError as err:
        errors.bad(str(err))
        return None


def _first_errors(errors: ErrorLog) -> str:
    return f" First problems: {' | '.join(errors.first)}" if errors.first else ""


def clean(examples: list[Example], tally: Tally, seen: set[Example], dedupe: bool = True) -> list[Example]:
    """Drop empty examples and, with `dedupe`, exact duplicates (also of those in `seen`), counting both."""
    kept = []
    for example in examples:
        if example.is_empty():
            tally.dropped["empty"] += 1
        elif dedupe and example in seen:
            tally.dropped["duplicate"] += 1
        else:
            seen.add(example)
            kept.append(example)
    return kept


def fit_length(
    encoded: list[Encoded], examples: list[Example], cfg: DataConfig, tally: Tally
) -> tuple[list[Encoded], list[Example]]:
    """Apply max_seq_length (drop or truncate) and drop examples with no token left to learn from."""
    kept_enc, kept_ex = [], []
    for enc, example in zip(encoded, examples, strict=True):
        if len(enc.input_ids) > cfg.max_seq_length:
            if cfg.overlength == "drop":
                tally.dropped["too_long"] += 1
                continue
            enc = Encoded(enc.input_ids[: cfg.max_seq_length], enc.labels[: cfg.max_seq_length])
            tally.truncated += 1
        if enc.trained_tokens == 0:
            tally.dropped["no_trained_tokens"] += 1
            continue
        kept_enc.append(enc)
        kept_ex.append(example)
    return kept_enc, kept_ex


def prepare(cfg: DataConfig, tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    """Prepare `cfg.source` for training with `tokenizer`; write the prepared folder; return its stats."""
    errors, tally = ErrorLog(cfg.on_error), Tally()
    examples, fmt, tally.rows_in = load_examples(cfg, errors)
    template = configure_tokenizer(tokenizer, cfg.chat_template) if fmt != "text" else "none (plain text)"
    seen: set[Example] = set()
    examples = _subsample(clean(examples, tally, seen, cfg.dedupe), cfg, tally)
    train_enc, train_ex = fit_length(_encode(tokenizer, examples, cfg), examples, cfg, tally)
    eval_tally = Tally()
    if cfg.eval_split:
        eval_enc, eval_ex = _provided_eval(cfg, tokenizer, eval_tally, seen)
    else:
        train_enc, train_ex, eval_enc, eval_ex = _split(train_enc, train_ex, cfg, tally)
    tally.dropped["invalid"] += errors.count
    out = Path(out_dir)
    _write(out, tokenizer, train_enc, eval_enc, eval_ex)
    stats = _stats(cfg, fmt, template, tally, errors, train_enc, eval_enc, tokenizer)
    if cfg.eval_split:
        stats["eval_rows_in"] = eval_tally.rows_in
        stats["eval_dropped"] = {k: v for k, v in sorted(eval_tally.dropped.items()) if v}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    (out / "report.html").write_text(report.to_html(stats), encoding="utf-8")
    return stats


def _encode(tokenizer: Any, examples: list[Example], cfg: DataConfig) -> list[Encoded]:
    return encode_examples(tokenizer, examples, cfg.train_on_responses_only)


def _provided_eval(
    cfg: DataConfig, tokenizer: Any, tally: Tally, seen: set[Example]
) -> tuple[list[Encoded], list[Example]]:
    """The eval split or file named by data.eval_split, counted in its own tally."""
    assert cfg.eval_split is not None
    errors = ErrorLog(cfg.on_error)
    examples, _, tally.rows_in = load_examples(cfg, errors, split=cfg.eval_split)
    examples = clean(examples, tally, seen, cfg.dedupe)  # an eval example equal to a train one would leak: dropped
    encoded, examples = fit_length(_encode(tokenizer, examples, cfg), examples, cfg, tally)
    tally.dropped["invalid"] += errors.count
    if not encoded:
        raise DataError(
            f"data.eval_split '{cfg.eval_split}' has no usable rows after cleaning ({dict(tally.dropped)})."
        )
    return encoded, examples


def _split(
    encoded: list[Encoded], examples: list[Example], cfg: DataConfig, tally: Tally
) -> tuple[list[Encoded], list[Example], list[Encoded], list[Example]]:
    if len(encoded) < 2:
        raise DataError(
            f"Only {len(encoded)} usable rows in '{cfg.source}' after cleaning (dropped: {dict(tally.dropped)}); "
            f"a train/eval split needs at least 2. Check data.max_seq_length, data.format and data.columns."
        )
    order = list(range(len(encoded)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = min(max(1, round(len(encoded) * cfg.eval_fraction)), len(encoded) - 1)
    train_idx, eval_idx = sorted(order[n_eval:]), sorted(order[:n_eval])
    return (
        [encoded[i] for i in train_idx],
        [examples[i] for i in train_idx],
        [encoded[i] for i in eval_idx],
        [examples[i] for i in eval_idx],
    )


def _subsample(examples: list[Example], cfg: DataConfig, tally: Tally) -> list[Example]:
    """At most `cfg.max_rows` examples, a seeded sample; the rest are counted as dropped."""
    if cfg.max_rows is None or len(examples) <= cfg.max_rows:
        return examples
    tally.dropped["over_max_rows"] += len(examples) - cfg.max_rows
    return random.Random(cfg.seed).sample(examples, cfg.max_rows)


def _write(out: Path, tokenizer: Any, train: list[Encoded], evals: list[Encoded], eval_ex: list[Example]) -> None:
    from datasets import Dataset
    from datasets import utils as datasets_tqdm

    was_disabled = datasets_tqdm.are_progress_bars_disabled()
    datasets_tqdm.disable_progress_bars()  # saving takes well under a second; its bars would only be noise
    try:
        for name, rows in (("train", train), ("eval", evals)):
            columns = {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
            Dataset.from_dict(columns).save_to_disk(str(out / name))
    finally:
        if not was_disabled:
            datasets_tqdm.enable_progress_bars()
    with (out / "eval_prompts.jsonl").open("w", encoding="utf-8") as f:
        for example in eval_ex:
            if not example.is_text:
                prompt, reference = prompt_for_last_answer(tokenizer, example)
                f.write(json.dumps({"prompt": prompt, "reference": reference}, ensure_ascii=False) + "\n")
    tokenizer.save_pretrained(str(out / "tokenizer"))


def _stats(
    cfg: DataConfig,
    fmt: str,
    template: str,
    tally: Tally,
    errors: ErrorLog,
    train: Sequence[Encoded],
    evals: Sequence[Encoded],
    tokenizer: Any,
) -> dict[str, Any]:
    lengths = [len(e.input_ids) for e in (*train, *evals)]
    trained = sum(e.trained_tokens for e in train)
    return {
        "source": cfg.source,
        "format": fmt,
        "format_detected": cfg.format == "auto",
        "template": template,
        "rows_in": tally.rows_in,
        "rows_kept": len(train) + (0 if cfg.eval_split else len(evals)),  # rows_in = rows_kept + dropped
        "dropped": {k: v for k, v in sorted(tally.dropped.items()) if v},
        "truncated": tally.truncated,
        "first_errors": errors.first,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "eval_from": f"split '{cfg.eval_split}'"
        if cfg.eval_split
        else f"{cfg.eval_fraction:.0%} of rows, seed {cfg.seed}",
        "token_length": report.length_summary(lengths),
        "length_histogram": report.histogram(lengths),
        "train_tokens": sum(len(e.input_ids) for e in train),
        "trained_tokens": trained,
        "fingerprint": fingerprint_of(train, evals),
        "example": report.marked_segments(tokenizer, train[0].input_ids, train[0].labels),
    }


def fingerprint_of(train: Sequence[Encoded], evals: Sequence[Encoded]) -> str:
    """A short hash of exactly what training and evaluation will see (tokens and labels, in order).

    Runs on different data, templates, masking or tokenizers get different fingerprints.

    >>> fingerprint_of([Encoded([1, 2], [-100, 2])], []) != fingerprint_of([Encoded([1, 2], [1, 2])], [])
    True
    """
    digest = hashlib.sha256()
    for part in (train, evals):
        for enc in part:
            digest.update(array("q", enc.input_ids).tobytes())  # raw int64 bytes: 10x faster than hashing repr()
            digest.update(array("q", enc.labels).tobytes())
            digest.update(b";")
        digest.update(b"|")
    return digest.hexdigest()[:16]
