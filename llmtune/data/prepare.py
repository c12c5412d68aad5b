"""The whole preparation: read, convert, clean, mix, encode, filter by length, split, write the prepared folder.

Each source (`data.source`, or each entry of `data.sources`) is read, converted and cleaned on its own, with
its own counts; duplicates are found across all of them. Then rows are drawn from each (all of them, or the
shares their weights ask for, see `llmtune.data.mix`), encoded, and the mix is split into train and eval.

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
from llmtune.config import DataConfig, DataEntry
from llmtune.data import report
from llmtune.data.encode import Encoded, encode_kept, instruction_for_last_answer, prompt_for_last_answer
from llmtune.data.errors import DataError, ErrorLog
from llmtune.data.formats import Example, detect_format, to_example, used_columns
from llmtune.data.mix import MixPlan, after_fraction, plan_mix
from llmtune.data.preference import chosen_row, detect_preference, preference_columns, refusal
from llmtune.data.sources import Record, read_records, source_fingerprint
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
DELIBERATE_DROPS = ("over_max_rows", "over_fraction", "over_weight", "undesirable")
MEDIA_COLUMNS = ("images", "image", "audios", "audio", "videos", "video")


def load_examples(cfg: DataConfig, errors: ErrorLog, split: str | None = None) -> Loaded:
    """Read `cfg.source` (or an eval split/file) and convert every row; DataError when no row is usable.

    `cfg` names one source: `data.source`, or one entry of `data.sources` (`DataConfig.entries()`).
    """
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
    if split is not None and Path(split).exists():  # data.eval_split may name a separate file or folder
        return split, "train"
    if cfg.source is None:
        raise ValueError("load_examples reads one source: pass one of DataConfig.entries(), not data.sources")
    return cfg.source, split or cfg.split


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


@dataclass
class SourceRows:
    """One source on its way through preparation: what was read, drawn and kept, with its own counts."""

    entry: DataEntry
    loaded: Loaded
    errors: ErrorLog
    tally: Tally = field(default_factory=Tally)
    examples: list[Example] = field(default_factory=list)  # cleaned, then the drawn ones, then the kept ones
    encoded: list[Encoded] = field(default_factory=list)  # the kept ones, aligned with `examples`
    available: int = 0  # clean rows left after the entry's fraction: what a weight can draw from
    drawn: int = 0  # rows drawn into the mix, before encoding and the length limit


def prepare(cfg: DataConfig, tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    """Prepare `cfg.source`, or each entry of `cfg.sources` mixed, for training with `tokenizer`; write the
    prepared folder; return its stats (with `sources`, the counts of each, when there are several).

    Templates that print today's date print data.template_date when it is set.
    """
    with template_date(cfg.template_date):
        return _prepare(cfg, tokenizer, out_dir)


def _prepare(cfg: DataConfig, tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    parts = [_load_source(entry) for entry in cfg.entries()]
    template = _template_for(tokenizer, cfg, parts)
    seen: set[Example] = set()
    for part in parts:
        part.examples = clean(part.loaded.examples, part.tally, seen, cfg.dedupe)
    plan = _draw(parts, cfg)
    for part in parts:
        _encode_source(part, tokenizer, cfg, template)
    tally, errors = _totals(parts)
    encoded, examples, origin = _mixed(parts, cfg.seed)
    eval_tally = Tally()
    if cfg.eval_split:
        train_idx, eval_idx = list(range(len(encoded))), list[int]()
        eval_enc, eval_ex = _provided_eval(cfg, tokenizer, template, eval_tally, seen)
    else:
        train_idx, eval_idx = _split(len(encoded), cfg, tally, errors)
        eval_enc, eval_ex = [encoded[i] for i in eval_idx], [examples[i] for i in eval_idx]
    train_enc = [encoded[i] for i in train_idx]
    loaded = _combined(parts)
    warnings = _warnings(cfg, tally, loaded) + _mix_warnings(parts, plan)
    out = PreparedData(str(out_dir))
    _write(out, tokenizer, train_enc, eval_enc, eval_ex)
    stats = _stats(cfg, loaded, template, tally, errors, train_enc, eval_enc, tokenizer)
    stats.update(_content_counts([*(examples[i] for i in train_idx), *eval_ex]), warnings=warnings)
    if len(parts) > 1:
        stats["sources"] = _per_source(parts, plan, origin, train_idx, eval_idx)
        stats["mix"] = _mix_summary(parts, plan, cfg)
    if cfg.eval_split:
        stats["eval_rows_in"] = eval_tally.rows_in
        stats["eval_dropped"] = {k: v for k, v in sorted(eval_tally.dropped.items()) if v}
    out.stats_file.write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    out.report_file.write_text(report.to_html(stats), encoding="utf-8")
    return stats


def _load_source(entry: DataEntry) -> SourceRows:
    """Read and convert one source; with several, a problem names the entry (`data.sources[1] (b.jsonl): ...`)."""
    errors = ErrorLog(entry.cfg.on_error)
    try:
        loaded = load_examples(entry.cfg, errors)
    except DataError as err:
        raise DataError(in_entry(entry, str(err))) from None
    part = SourceRows(entry, loaded, errors)
    part.tally.rows_in, part.tally.dropped = loaded.rows_read, Counter(loaded.dropped)
    return part


def in_entry(entry: DataEntry, message: str) -> str:
    """A data problem of one entry of data.sources, with the entry's index and the keys that say how it is read.

    >>> from llmtune.config import DataConfig
    >>> in_entry(DataConfig(sources=["a.jsonl", "b.jsonl"]).entries()[1], "b.jsonl, line 2: no 'output'.")
    "data.sources[1] (b.jsonl): b.jsonl, line 2: no 'output'. This entry is read as format auto; check \
data.sources[1].format, data.sources[1].columns and data.sources[1].role_map."
    """
    if entry.key == "data.source":
        return message
    key = entry.key
    return (
        f"{key} ({entry.label}): {message} This entry is read as format {entry.cfg.format}; check {key}.format, "
        f"{key}.columns and {key}.role_map."
    )


def _template_for(tokenizer: Any, cfg: DataConfig, parts: Sequence[SourceRows]) -> str:
    """The chat template every chat source is rendered with (none when all of them are plain text)."""
    if all(part.loaded.format == "text" for part in parts):
        return "none (plain text)"
    template = configure_tokenizer(tokenizer, cfg.chat_template, cfg.pad_token)
    for part in parts:
        try:
            check_renders_tools(tokenizer, template, part.loaded.examples)
        except DataError as err:
            raise DataError(in_entry(part.entry, str(err))) from None
    return template


def _draw(parts: Sequence[SourceRows], cfg: DataConfig) -> MixPlan | None:
    """Keep each entry's fraction, then the rows the weights ask for, or at most data.max_rows of all (seeded).

    Returns the weights' plan, or None when the entries have no weights.
    """
    for part in parts:
        keep = after_fraction(len(part.examples), part.entry.fraction)
        part.examples = _sample(part.examples, keep, cfg.seed, part.tally, "over_fraction")
        part.available = len(part.examples)
    weights = [part.entry.weight for part in parts]
    if any(w is None for w in weights):
        _cap_total(parts, cfg)
        return None
    for part in parts:
        if part.available == 0:  # e.g. every row a duplicate of another source's: no share of it can be drawn
            dropped = ", ".join(f"{k} {n}" for k, n in sorted(part.tally.dropped.items()) if n)
            raise DataError(
                f"{part.entry.key} ({part.entry.label}) has no rows left after cleaning (dropped: {dropped}), so "
                f"its weight cannot be met. Remove the entry, or check its rows and data.dedupe."
            )
    plan = plan_mix([part.available for part in parts], [w for w in weights if w is not None], cfg.max_rows)
    for part, by_weight, count in zip(parts, plan.by_weight, plan.counts, strict=True):
        part.examples = _sample(part.examples, by_weight, cfg.seed, part.tally, "over_weight")
        part.examples = _sample(part.examples, count, cfg.seed, part.tally, "over_max_rows")
        part.drawn = len(part.examples)
    return plan


def _cap_total(parts: Sequence[SourceRows], cfg: DataConfig) -> None:
    """Without weights: at most data.max_rows rows of all the sources together, a seeded sample of them."""
    pooled = [(i, example) for i, part in enumerate(parts) for example in part.examples]
    if cfg.max_rows is not None and len(pooled) > cfg.max_rows:
        chosen = random.Random(cfg.seed).sample(pooled, cfg.max_rows)  # as one source's rows were sampled before
        for i, part in enumerate(parts):
            kept = [example for j, example in chosen if j == i]
            part.tally.dropped["over_max_rows"] += len(part.examples) - len(kept)
            part.examples = kept
    for part in parts:
        part.drawn = len(part.examples)


def _sample(examples: list[Example], keep: int, seed: int, tally: Tally, reason: str) -> list[Example]:
    """`keep` of `examples` (a seeded sample), the others counted as dropped for `reason`."""
    if keep >= len(examples):
        return examples
    tally.dropped[reason] += len(examples) - keep
    return random.Random(seed).sample(examples, keep)


def _encode_source(part: SourceRows, tokenizer: Any, cfg: DataConfig, template: str) -> None:
    try:
        encoded, examples = _encode(tokenizer, part.examples, cfg, part.errors, template)
    except DataError as err:
        raise DataError(in_entry(part.entry, str(err))) from None
    part.encoded, part.examples = fit_length(encoded, examples, cfg, part.tally)
    part.tally.dropped["invalid"] += part.errors.count


def _encode(
    tokenizer: Any, examples: list[Example], cfg: DataConfig, errors: ErrorLog, template: str
) -> tuple[list[Encoded], list[Example]]:
    return encode_kept(tokenizer, examples, cfg.train_on_responses_only, errors, describe_template(tokenizer, template))


def _totals(parts: Sequence[SourceRows]) -> tuple[Tally, ErrorLog]:
    """The counts of all sources together; skipped rows' messages name their entry when there are several."""
    total, errors = Tally(), ErrorLog(parts[0].errors.policy)
    for part in parts:
        total.rows_in += part.tally.rows_in
        total.dropped += part.tally.dropped
        total.truncated += part.tally.truncated
        total.lengths_before_limit += part.tally.lengths_before_limit
        errors.count += part.errors.count
        errors.split += part.errors.split
        errors.first_split = errors.first_split or part.errors.first_split
        prefix = "" if len(parts) == 1 else f"{part.entry.key}: "
        errors.first += [prefix + message for message in part.errors.first]
    errors.first = errors.first[: ErrorLog.KEEP]
    return total, errors


def _mixed(parts: Sequence[SourceRows], seed: int) -> tuple[list[Encoded], list[Example], list[int]]:
    """The kept rows of every source, shuffled together with the seed, and the source index of each."""
    rows = [(enc, ex, i) for i, part in enumerate(parts) for enc, ex in zip(part.encoded, part.examples, strict=True)]
    if len(parts) > 1:  # one source keeps its file order, as before data.sources existed
        random.Random(seed).shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _combined(parts: Sequence[SourceRows]) -> Loaded:
    """What reading found, over all sources: their formats (joined by ' + ' when they differ), unused columns."""
    if len(parts) == 1:
        return parts[0].loaded
    formats = list(dict.fromkeys(part.loaded.format for part in parts))
    preference = next((part.loaded.preference for part in parts if part.loaded.preference), None)
    unused = sorted({column for part in parts for column in part.loaded.unused_columns})
    return Loaded([], " + ".join(formats), sum(part.loaded.rows_read for part in parts), Counter(), preference, unused)


def _per_source(
    parts: Sequence[SourceRows], plan: MixPlan | None, origin: list[int], train_idx: list[int], eval_idx: list[int]
) -> list[dict[str, Any]]:
    """Each source's counts: rows in, drops by reason, rows kept, its train and eval rows and share of the mix."""
    train, evals = Counter(origin[i] for i in train_idx), Counter(origin[i] for i in eval_idx)
    kept_total = max(1, len(origin))
    return [
        {
            "key": part.entry.key,
            "name": part.entry.label,
            "source": part.entry.cfg.source,
            "format": part.loaded.format,
            "unused_columns": part.loaded.unused_columns,
            "weight": part.entry.weight,
            "target_share": round(plan.shares[i], 4) if plan else None,
            "fraction": part.entry.fraction,
            "rows_in": part.tally.rows_in,
            "available": part.available,
            "drawn": part.drawn,
            "dropped": {k: v for k, v in sorted(part.tally.dropped.items()) if v},
            "rows_kept": len(part.encoded),
            "share": round(len(part.encoded) / kept_total, 4),
            "train_rows": train[i],
            "eval_rows": evals[i],
        }
        for i, part in enumerate(parts)
    ]


def _mix_warnings(parts: Sequence[SourceRows], plan: MixPlan | None) -> list[str]:
    """A line for each source that the weights left more than half unused (the smallest source sets the size)."""
    if plan is None or plan.limited_by is None:
        return []
    limit = parts[plan.limited_by].entry
    return [
        f"{part.entry.key} ({part.entry.label}): only {part.drawn} of its {part.available} rows are used, since "
        f"{limit.key} ({limit.label}) has {parts[plan.limited_by].available} rows for its weight share and rows are "
        f"not repeated. Raise {part.entry.key}.weight (or lower {limit.key}.weight) to use more of them, or drop "
        f"the weights to use every row of every source."
        for part in parts
        if part.drawn * 2 < part.available
    ]


def _mix_summary(parts: Sequence[SourceRows], plan: MixPlan | None, cfg: DataConfig) -> str:
    """One sentence on how the mix was drawn, for the report."""
    if plan is None:
        return "every row of each source" + (
            f", then at most data.max_rows={cfg.max_rows} of all" if cfg.max_rows else ""
        )
    if plan.limited_by is None:
        return f"{plan.total} rows in the weights' shares (data.max_rows={cfg.max_rows})"
    limit = parts[plan.limited_by].entry
    return (
        f"{plan.total} rows in the weights' shares: {limit.key} ({limit.label}) is used in full and sets the size; "
        f"rows are not repeated"
    )


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
    """The eval split or file named by data.eval_split, counted in its own tally.

    A file or folder is read with the data section's settings; a split name is read from each source.
    """
    assert cfg.eval_split is not None
    errors = ErrorLog(cfg.on_error)
    encoded: list[Encoded] = []
    examples: list[Example] = []
    readers = [cfg] if Path(cfg.eval_split).exists() else [entry.cfg for entry in cfg.entries()]
    for reader in readers:
        loaded = load_examples(reader, errors, split=cfg.eval_split)
        tally.rows_in += loaded.rows_read
        tally.dropped += loaded.dropped
        kept = clean(loaded.examples, tally, seen, cfg.dedupe)  # an eval example equal to a train one would leak
        more_enc, more_ex = fit_length(*_encode(tokenizer, kept, cfg, errors, template), cfg, tally)
        encoded, examples = encoded + more_enc, examples + more_ex
    tally.dropped["invalid"] += errors.count
    if not encoded:
        raise DataError(
            f"data.eval_split '{cfg.eval_split}' has no usable rows after cleaning ({dict(tally.dropped)})."
            + _first_errors(errors)
        )
    return encoded, examples


def _split(n_rows: int, cfg: DataConfig, tally: Tally, errors: ErrorLog) -> tuple[list[int], list[int]]:
    """Train and eval row indices: `data.eval_fraction` of the rows held out, chosen with the seed."""
    if n_rows < 2:
        dropped = dict(tally.dropped + Counter(invalid=errors.count))
        raise DataError(
            f"Only {n_rows} usable rows in '{cfg.describe()}' after cleaning (dropped: {dropped}); "
            f"a train/eval split needs at least 2. Check data.max_seq_length, data.format and data.columns."
            + _first_errors(errors)
        )
    order = list(range(n_rows))
    random.Random(cfg.seed).shuffle(order)
    n_eval = min(max(1, round(n_rows * cfg.eval_fraction)), n_rows - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


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
                row = {"instruction": instruction_for_last_answer(example), "prompt": prompt, "reference": reference}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
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
        "source": cfg.describe(),
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


def sources_fingerprint(cfg: DataConfig) -> str:
    """A hash of the bytes of every local source (data.source or each entry of data.sources), for the step cache.

    >>> import tempfile, pathlib
    >>> a, b = (pathlib.Path(tempfile.mkdtemp()) / name for name in ("a.jsonl", "b.jsonl"))
    >>> _ = a.write_text("a"); _ = b.write_text("b"); cfg = DataConfig(sources=[str(a), str(b)])
    >>> before = sources_fingerprint(cfg); _ = b.write_text("c"); before != sources_fingerprint(cfg)
    True
    """
    return " ".join(source_fingerprint(str(entry.cfg.source)) for entry in cfg.entries())


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
