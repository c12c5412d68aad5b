"""The whole preparation: read, convert, clean, encode, filter by length, split, write the prepared folder.

The folder (see `PreparedData`) has `train/` and `eval/` in `datasets.save_to_disk` format with
`input_ids` and `labels` (-100 where no loss), the rendered eval prompts with their references (for the
generation metrics), the tokenizer (the template every later stage uses), the statistics and an HTML report
(what preparation did, with a token-length histogram): the folder `llmtune.artifacts.PreparedData` names.
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

from llmtune.artifacts import PreparedData
from llmtune.config import DataConfig
from llmtune.data import report
from llmtune.data.encode import Encoded, encode_kept, prompt_for_last_answer
from llmtune.data.errors import DataError, ErrorLog
from llmtune.data.formats import Example, detect_format, to_example, used_columns
from llmtune.data.preference import chosen_row, detect_preference, preference_columns, refusal
from llmtune.data.sources import Record, read_records
from llmtune.data.templates import check_renders_tools, configure_tokenizer, describe_template, template_date


@dataclass
class Tally:
    """Rows in, and rows dropped by reason, through every stage."""

    rows_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    lengths_before_limit: list[int] = field(default_factory=list)  # token lengths of every encoded example


@dataclass
class Loaded:
    """Examples read and converted from a source, with what reading them found."""

    examples: list[Example]
    format: str
    rows_read: int
    dropped: Counter[str] = field(default_factory=Counter)  # rows left out on purpose (KTO rows labelled false)
    preference: str | None = None  # 'dpo' or 'kto' when the file is preference data used as data.preference asks
    unused_columns: list[str] = field(default_factory=list)


# Drops the user asked for (a subsample, KTO rows labelled false) do not count towards data.max_dropped_fraction.
DELIBERATE_DROPS = ("over_max_rows", "undesirable")
MEDIA_COLUMNS = ("images", "image", "audios", "audio", "videos", "video")


def load_examples(cfg: DataConfig, errors: ErrorLog, split: str | None = None) -> Loaded:
    """Read `cfg.source` (or an eval split/file) and convert every row; DataError when no row is usable."""
    source, split = _where_to_read(cfg, split)
    records = read_records(
        source, split, errors, subset=cfg.subset, revision=cfg.revision, text_sample_by=cfg.text_sample_by
    )
    rows_read = len(records) + errors.count
    if not records:
        raise DataError(f"Dataset '{source}' (split '{split}') has no usable rows." + _first_errors(errors))
    kind = detect_preference(records[0].row, cfg.columns)
    if kind and cfg.preference == "refuse":
        raise DataError(refusal(kind, records[0].where, records[0].row))
    converted, dropped = _chosen_records(records, kind, cfg, errors) if kind else (records, Counter[str]())
    if not converted:
        reason = f" (dropped: {dict(dropped)})" if dropped else ""
        raise DataError(f"Dataset '{source}' (split '{split}') has no usable rows{reason}." + _first_errors(errors))
    fmt = cfg.format if cfg.format != "auto" else _detect(converted[0], cfg)
    examples = [e for e in (_convert(r, fmt, cfg, errors) for r in converted) if e is not None]
    if not examples:
        raise DataError(f"Dataset '{source}' (split '{split}') has no usable rows." + _first_errors(errors))
    unused = _unused_columns(records, fmt, cfg, kind)
    return Loaded(examples, fmt, rows_read, dropped, kind, unused)


def _chosen_records(
    records: list[Record], kind: str, cfg: DataConfig, errors: ErrorLog
) -> tuple[list[Record], Counter[str]]:
    """Preference rows as SFT rows with the chosen answer; KTO rows labelled false are counted as undesirable."""
    kept, dropped = [], Counter[str]()
    for record in records:
        try:
            row = chosen_row(record.row, kind, record.where, cfg.columns)
        except DataError as err:
            errors.bad(str(err))
            continue
        if row is None:
            dropped["undesirable"] += 1
        else:
            kept.append(Record(row, record.where))
    return kept, dropped


def _unused_columns(records: list[Record], fmt: str, cfg: DataConfig, kind: str | None) -> list[str]:
    present: set[str] = set()
    for record in records:
        present.update(record.row)
    used = used_columns(fmt, cfg.columns) | (preference_columns(cfg.columns) if kind else set())
    return sorted(present - used)


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
        return to_example(record.row, fmt, record.where, cfg.columns, cfg.role_map, cfg.non_text_parts)
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
        tally.lengths_before_limit.append(len(enc.input_ids))
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
    """Prepare `cfg.source` for training with `tokenizer`; write the prepared folder; return its stats.

    Templates that print today's date print data.template_date when it is set.
    """
    with template_date(cfg.template_date):
        return _prepare(cfg, tokenizer, out_dir)


def _prepare(cfg: DataConfig, tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    errors, tally = ErrorLog(cfg.on_error), Tally()
    loaded = load_examples(cfg, errors)
    tally.rows_in, tally.dropped = loaded.rows_read, Counter(loaded.dropped)
    chat = loaded.format != "text"
    template = configure_tokenizer(tokenizer, cfg.chat_template, cfg.pad_token) if chat else "none (plain text)"
    check_renders_tools(tokenizer, template, loaded.examples)
    seen: set[Example] = set()
    examples = _subsample(clean(loaded.examples, tally, seen, cfg.dedupe), cfg, tally)
    train_enc, train_ex = fit_length(*_encode(tokenizer, examples, cfg, errors, template), cfg, tally)
    eval_tally = Tally()
    if cfg.eval_split:
        eval_enc, eval_ex = _provided_eval(cfg, tokenizer, template, eval_tally, seen)
    else:
        train_enc, train_ex, eval_enc, eval_ex = _split(train_enc, train_ex, cfg, tally, errors)
    tally.dropped["invalid"] += errors.count
    warnings = _warnings(cfg, tally, loaded)
    out = PreparedData(str(out_dir))
    _write(out, tokenizer, train_enc, eval_enc, eval_ex)
    stats = _stats(cfg, loaded, template, tally, errors, train_enc, eval_enc, tokenizer)
    stats.update(_content_counts([*train_ex, *eval_ex]), warnings=warnings)
    if cfg.eval_split:
        stats["eval_rows_in"] = eval_tally.rows_in
        stats["eval_dropped"] = {k: v for k, v in sorted(eval_tally.dropped.items()) if v}
    out.stats_file.write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    out.report_file.write_text(report.to_html(stats), encoding="utf-8")
    return stats


def _encode(
    tokenizer: Any, examples: list[Example], cfg: DataConfig, errors: ErrorLog, template: str
) -> tuple[list[Encoded], list[Example]]:
    return encode_kept(tokenizer, examples, cfg.train_on_responses_only, errors, describe_template(tokenizer, template))


def _content_counts(examples: Sequence[Example]) -> dict[str, int]:
    """What was left out of the kept examples' loss or text: empty answers (masked), non-text parts (dropped)."""
    return {
        "empty_answers_masked": sum(e.empty_answers() for e in examples),
        "non_text_parts_dropped": sum(e.dropped_parts for e in examples),
    }


def _warnings(cfg: DataConfig, tally: Tally, loaded: Loaded) -> list[str]:
    """Lines for the report and the run summary; a drop share over the limit raises with on_too_many_dropped."""
    warnings = []
    if loaded.unused_columns:
        warnings.append(unused_columns_warning(loaded.unused_columns))
    too_many = dropped_share_warning(cfg, tally)
    if too_many and cfg.on_too_many_dropped == "raise":
        raise DataError(too_many + " Stopped because data.on_too_many_dropped is raise (warn goes on).")
    if too_many:
        warnings.append(too_many + " Set data.on_too_many_dropped: raise to stop on this instead.")
    return warnings


def unused_columns_warning(unused: Sequence[str]) -> str:
    """The warning for columns the format does not read.

    >>> unused_columns_warning(["id", "images"])
    "Columns not used for training: id, images. images: only text is trained, so '<image>'-style placeholders \
in the text are trained as plain text. Map a column that holds training text with data.columns."
    """
    media = [c for c in unused if c.lower() in MEDIA_COLUMNS]
    hint = (
        f" {', '.join(media)}: only text is trained, so '<image>'-style placeholders in the text are trained as "
        f"plain text."
        if media
        else ""
    )
    return (
        f"Columns not used for training: {', '.join(unused)}.{hint} Map a column that holds training text with "
        f"data.columns."
    )


def dropped_share_warning(cfg: DataConfig, tally: Tally) -> str | None:
    """A warning when more than data.max_dropped_fraction of the rows was dropped, with the lengths and settings."""
    counted = {k: n for k, n in tally.dropped.items() if n and k not in DELIBERATE_DROPS}
    considered = tally.rows_in - sum(tally.dropped[k] for k in DELIBERATE_DROPS)
    share = sum(counted.values()) / considered if considered else 0.0
    if share <= cfg.max_dropped_fraction:
        return None
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(counted.items(), key=lambda kv: -kv[1]))
    message = (
        f"{share:.0%} of the rows were dropped ({sum(counted.values())} of {considered}: {reasons}), more than "
        f"data.max_dropped_fraction={cfg.max_dropped_fraction}."
    )
    if counted.get("too_long"):
        lengths = report.length_summary(tally.lengths_before_limit)
        shown = ", ".join(f"{k} {lengths[k]}" for k in ("p50", "p90", "p95", "p99", "max"))
        message += (
            f" Token lengths before the limit: {shown}; data.max_seq_length is {cfg.max_seq_length}. Raise "
            f"data.max_seq_length (e.g. to {lengths['p95']}, the p95) or set data.overlength: truncate."
        )
    if counted.get("invalid"):
        message += " The first skipped rows say why rows were invalid."
    return message


def _provided_eval(
    cfg: DataConfig, tokenizer: Any, template: str, tally: Tally, seen: set[Example]
) -> tuple[list[Encoded], list[Example]]:
    """The eval split or file named by data.eval_split, counted in its own tally."""
    assert cfg.eval_split is not None
    errors = ErrorLog(cfg.on_error)
    loaded = load_examples(cfg, errors, split=cfg.eval_split)
    tally.rows_in, tally.dropped = loaded.rows_read, Counter(loaded.dropped)
    examples = clean(loaded.examples, tally, seen, cfg.dedupe)  # an eval example equal to a train one would leak
    encoded, examples = fit_length(*_encode(tokenizer, examples, cfg, errors, template), cfg, tally)
    tally.dropped["invalid"] += errors.count
    if not encoded:
        raise DataError(
            f"data.eval_split '{cfg.eval_split}' has no usable rows after cleaning ({dict(tally.dropped)})."
            + _first_errors(errors)
        )
    return encoded, examples


def _split(
    encoded: list[Encoded], examples: list[Example], cfg: DataConfig, tally: Tally, errors: ErrorLog
) -> tuple[list[Encoded], list[Example], list[Encoded], list[Example]]:
    if len(encoded) < 2:
        dropped = dict(tally.dropped + Counter(invalid=errors.count))
        raise DataError(
            f"Only {len(encoded)} usable rows in '{cfg.source}' after cleaning (dropped: {dropped}); "
            f"a train/eval split needs at least 2. Check data.max_seq_length, data.format and data.columns."
            + _first_errors(errors)
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


def _write(
    out: PreparedData, tokenizer: Any, train: list[Encoded], evals: list[Encoded], eval_ex: list[Example]
) -> None:
    from datasets import Dataset
    from datasets import utils as datasets_tqdm

    was_disabled = datasets_tqdm.are_progress_bars_disabled()
    datasets_tqdm.disable_progress_bars()  # saving takes well under a second; its bars would only be noise
    try:
        for folder, rows in ((out.train_dir, train), (out.eval_dir, evals)):
            columns = {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
            Dataset.from_dict(columns).save_to_disk(str(folder))
    finally:
        if not was_disabled:
            datasets_tqdm.enable_progress_bars()
    with out.eval_prompts_file.open("w", encoding="utf-8") as f:
        for example in eval_ex:
            if not example.is_text:
                prompt, reference = prompt_for_last_answer(tokenizer, example)
                f.write(json.dumps({"prompt": prompt, "reference": reference}, ensure_ascii=False) + "\n")
    tokenizer.save_pretrained(str(out.tokenizer_dir))


def _stats(
    cfg: DataConfig,
    loaded: Loaded,
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
        "format": loaded.format,
        "format_detected": cfg.format == "auto",
        "preference": loaded.preference,
        "unused_columns": loaded.unused_columns,
        "template": template,
        "pad_token": f"{tokenizer.pad_token}",
        "rows_in": tally.rows_in,
        "rows_kept": len(train) + (0 if cfg.eval_split else len(evals)),  # rows_in = rows_kept + dropped
        "dropped": {k: v for k, v in sorted(tally.dropped.items()) if v},
        "truncated": tally.truncated,
        "first_errors": errors.first,
        "split_conversations": errors.split,  # trained one sequence per answer (see encode.encode_kept)
        "first_split": errors.first_split,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "eval_from": f"split '{cfg.eval_split}'"
        if cfg.eval_split
        else f"{cfg.eval_fraction:.0%} of rows, seed {cfg.seed}",
        "token_length": report.length_summary(lengths),
        "token_length_before_limit": report.length_summary(tally.lengths_before_limit),
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
