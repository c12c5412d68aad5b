"""The prepared folder and its accounting: cleaning, length, splits, bad-row policy, templates, report, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtune.artifacts import PreparedData
from llmtune.config import DataConfig
from llmtune.data import DataError, prepare

IGNORE = -100


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"instruction": f"Repeat {i}.", "input": "", "output": f"number {i}"} for i in range(start, start + n)]


def write(path: Path, items: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items), encoding="utf-8")
    return path


def run_prepare(tmp_path: Path, model_dir: Path, **cfg: Any) -> dict[str, Any]:
    return prepare(DataConfig(**cfg), AutoTokenizer.from_pretrained(model_dir), tmp_path / "out")


def test_prepared_folder_accounts_for_every_row(prepared_dir: Path, demo_rows: list) -> None:
    stats = PreparedData(str(prepared_dir)).stats()
    train, evals = load_from_disk(str(prepared_dir / "train")), load_from_disk(str(prepared_dir / "eval"))
    assert stats["rows_in"] == len(demo_rows) == stats["rows_kept"] + sum(stats["dropped"].values())
    assert (len(train), len(evals)) == (stats["train_rows"], stats["eval_rows"])
    assert len(evals) == round(0.1 * stats["rows_kept"])
    assert len(PreparedData(str(prepared_dir)).eval_prompts()) == len(evals)
    assert PreparedData(str(prepared_dir)).eval_prompts()[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert AutoTokenizer.from_pretrained(prepared_dir / "tokenizer").chat_template
    assert stats["trained_tokens"] == sum(sum(label != IGNORE for label in r) for r in train["labels"])
    assert stats["token_length"]["p50"] <= stats["token_length"]["p95"] <= stats["token_length"]["max"]
    assert sum(stats["length_histogram"]["counts"]) == len(train) + len(evals)


def test_report_marks_trained_tokens_and_draws_the_histogram(prepared_dir: Path) -> None:
    stats = PreparedData(str(prepared_dir)).stats()
    train = load_from_disk(str(prepared_dir / "train"))
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer")
    assert "".join(text for text, _ in stats["example"]) == tokenizer.decode(train[0]["input_ids"])
    trained = [text for text, is_trained in stats["example"] if is_trained]
    expected = [t for t, label in zip(train[0]["input_ids"], train[0]["labels"], strict=True) if label != IGNORE]
    assert "".join(trained) == tokenizer.decode(expected)
    page = (prepared_dir / "report.html").read_text()
    assert page.count("<rect") == len(stats["length_histogram"]["counts"]) and "rows kept" in page


def test_duplicates_and_empty_rows_are_dropped_and_counted(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = rows(10) + rows(3) + [{"instruction": "x", "input": "", "output": "  "}]
    source = write(tmp_path / "rows.jsonl", data)
    stats = run_prepare(tmp_path, tiny_model_dir, source=str(source))
    assert stats["dropped"] == {"duplicate": 3, "empty": 1} and stats["rows_kept"] == 10
    kept_all = run_prepare(tmp_path / "b", tiny_model_dir, source=str(source), dedupe=False)
    assert kept_all["rows_kept"] == 13


def test_overlength_rows_are_dropped_or_truncated_and_counted(
    tmp_path: Path, rows_file: Path, tiny_model_dir: Path
) -> None:
    dropped = run_prepare(tmp_path / "a", tiny_model_dir, source=str(rows_file), max_seq_length=30)
    assert dropped["dropped"]["too_long"] > 0 and dropped["token_length"]["max"] <= 30
    truncated = run_prepare(
        tmp_path / "b", tiny_model_dir, source=str(rows_file), max_seq_length=30, overlength="truncate"
    )
    assert truncated["truncated"] > 0 and "too_long" not in truncated["dropped"]
    assert truncated["token_length"]["max"] == 30


def test_examples_left_without_trained_tokens_are_dropped_and_an_empty_result_says_why(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    long_prompt = {"instruction": "word " * 40, "input": "", "output": "ok"}
    source = write(tmp_path / "rows.jsonl", [*rows(4), long_prompt])
    stats = run_prepare(tmp_path, tiny_model_dir, source=str(source), max_seq_length=24, overlength="truncate")
    assert stats["dropped"]["no_trained_tokens"] == 1
    only_long = write(tmp_path / "long.jsonl", [long_prompt])
    with pytest.raises(DataError, match=r"Only 0 usable rows.*no_trained_tokens"):
        run_prepare(tmp_path / "c", tiny_model_dir, source=str(only_long), max_seq_length=24, overlength="truncate")


def test_max_rows_subsamples_with_the_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = write(tmp_path / "rows.jsonl", rows(50))
    a = run_prepare(tmp_path / "a", tiny_model_dir, source=str(source), max_rows=20)
    b = run_prepare(tmp_path / "b", tiny_model_dir, source=str(source), max_rows=20)
    c = run_prepare(tmp_path / "c", tiny_model_dir, source=str(source), max_rows=20, seed=7)
    assert a["rows_kept"] == 20 and a["dropped"] == {"over_max_rows": 30}
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]


def test_provided_eval_split_by_name_or_file_drops_leaked_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    write(tmp_path / "folder" / "train.jsonl", rows(12))
    write(tmp_path / "folder" / "test.jsonl", rows(4, start=10))  # rows 10 and 11 are also in train
    stats = run_prepare(tmp_path, tiny_model_dir, source=str(tmp_path / "folder"), eval_split="test")
    assert (stats["train_rows"], stats["eval_rows"], stats["eval_dropped"]) == (12, 2, {"duplicate": 2})
    eval_file = write(tmp_path / "held_out.jsonl", rows(3, start=100))
    by_file = run_prepare(tmp_path / "b", tiny_model_dir, source=str(tmp_path / "folder"), eval_split=str(eval_file))
    assert (by_file["train_rows"], by_file["eval_rows"]) == (12, 3)


def test_skip_policy_counts_bad_rows_and_reports_the_first(tmp_path: Path, tiny_model_dir: Path) -> None:
    good = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(6)
    ]
    bad = [
        '{"messages": [',
        {"messages": [{"role": "narrator", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
    ]
    source = write(tmp_path / "rows.jsonl", [*good, *bad])
    with pytest.raises(DataError, match=r"rows.jsonl, line 7: malformed JSON"):
        run_prepare(tmp_path / "a", tiny_model_dir, source=str(source))
    stats = run_prepare(tmp_path / "b", tiny_model_dir, source=str(source), on_error="skip")
    assert stats["rows_in"] == 9 and stats["dropped"]["invalid"] == 3 and stats["rows_kept"] == 6
    for message, line in zip(stats["first_errors"], (7, 8, 9), strict=True):
        assert message.startswith(f"{source}, line {line}")


def test_named_template_is_saved_and_used_for_eval_prompts(
    tmp_path: Path, rows_file: Path, tiny_model_dir: Path
) -> None:
    stats = run_prepare(tmp_path, tiny_model_dir, source=str(rows_file), chat_template="alpaca", max_rows=40)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert stats["template"] == "alpaca" and "### Response:" in saved.chat_template
    assert PreparedData(str(tmp_path / "out")).eval_prompts()[0]["prompt"].endswith("### Response:\n")
    default = run_prepare(tmp_path / "b", tiny_model_dir, source=str(rows_file), max_rows=40)
    assert default["fingerprint"] != stats["fingerprint"], "a different template is different training data"


def test_plain_text_data_prepares_without_a_template(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = write(tmp_path / "text.jsonl", [{"text": f"the number {i} is here"} for i in range(20)])
    stats = run_prepare(tmp_path, tiny_model_dir, source=str(source))
    assert (stats["format"], stats["format_detected"], stats["template"]) == ("text", True, "none (plain text)")
    assert stats["trained_tokens"] == stats["train_tokens"]
    assert PreparedData(str(tmp_path / "out")).eval_prompts() == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": \n', "line 2: malformed JSON"),
        (b'{"instruction": "a"}\n', "line 1: missing field 'output'"),
        (b'{"messages": []}\n', "line 1: field 'messages' is an empty conversation"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}\n', "line 1, messages[0]: unknown role 'wizard'"),
        (b'{"messages": [{"role": "user", "content": {"a": 1}}]}\n', "'content' must be a string or a list of parts"),
        (b'{"instruction": "\xff", "output": "b"}\n', "line 1: not UTF-8 text"),
    ],
)
def test_cli_reports_bad_data_in_one_paragraph_without_traceback(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    import run as cli

    source = tmp_path / "bad.jsonl"
    source.write_bytes(content)
    code = cli.main(
        ["--pipeline", "prepare", "--set", f"data.source={source}", "--set", f"model.name={tiny_model_dir}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and expected in err and str(source) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_reports_a_missing_file(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import run as cli

    assert cli.main(["--pipeline", "prepare", "--set", "data.source=no/such/file.jsonl"]) == 2
    err = capsys.readouterr().err  # named where it was looked for: the folder the command ran in
    assert f"data.source: '{Path.cwd() / 'no/such/file.jsonl'}' does not exist" in err
    assert "read from the folder you run the command in" in err


FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_skip_with_no_usable_rows_names_the_first_problems(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import run as cli

    source = FIXTURES / "all_bad.jsonl"
    with pytest.raises(DataError, match=r"has no usable rows\. First problems: .*line 1: missing field 'output'") as e:
        run_prepare(tmp_path, tiny_model_dir, source=str(source), on_error="skip")
    assert "line 2: missing field 'instruction'" in str(e.value) and "line 3: field 'output'" in str(e.value)
    code = cli.main(["--pipeline", "prepare", "--set", f"data.source={source}", "--set", "data.on_error=skip"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "First problems:" in err and "line 3" in err


def test_dropping_most_rows_warns_with_lengths_and_settings_or_fails_when_strict(
    tmp_path: Path, tiny_model_dir: Path, prepared_dir: Path
) -> None:
    source = str(FIXTURES / "mostly_long.jsonl")
    stats = run_prepare(tmp_path / "a", tiny_model_dir, source=source, max_seq_length=40)
    [warning] = stats["warnings"]
    assert warning.startswith(
        "73% of the rows were dropped (8 of 11: too_long 8), more than data.max_dropped_fraction=0.2"
    )
    before = stats["token_length_before_limit"]
    assert f"p95 {before['p95']}" in warning and before["max"] > 40 >= stats["token_length"]["max"]
    assert "data.max_seq_length is 40" in warning and "data.overlength: truncate" in warning
    with pytest.raises(DataError, match=r"73% of the rows were dropped.*on_too_many_dropped is raise"):
        run_prepare(tmp_path / "b", tiny_model_dir, source=source, max_seq_length=40, on_too_many_dropped="raise")
    lenient = run_prepare(tmp_path / "c", tiny_model_dir, source=source, max_seq_length=40, max_dropped_fraction=0.8)
    assert lenient["warnings"] == []
    assert PreparedData(str(prepared_dir)).stats()["warnings"] == [], "the demo data drops nothing"
