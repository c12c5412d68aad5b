"""Row formats, format detection, column and role mapping, templates and loss masking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from llmtune.data import DataError, Example, configure_tokenizer, detect_format, encode_examples, to_example
from llmtune.data.formats import Turn

IGNORE = -100


@pytest.fixture()
def tokenizer(tiny_model_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    configure_tokenizer(tok, None)
    return tok


@pytest.fixture()
def base_tokenizer(tiny_model_dir: Path) -> Any:
    """The same vocabulary without a chat template, like a base model's tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    return tok


def trained_text(tokenizer: Any, example: Example, responses_only: bool = True) -> str:
    [enc] = encode_examples(tokenizer, [example], responses_only)
    return str(tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]))


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Spell 4."},
        {"from": "gpt", "value": "four"},
        {"from": "human", "value": "And 5?"},
        {"from": "gpt", "value": "five"},
    ]
}
MESSAGES = {"messages": [{"role": m["from"], "content": m["value"]} for m in SHAREGPT["conversations"]]}


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        (SHAREGPT, "sharegpt"),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"text": "plain"}, "text"),
    ],
)
def test_auto_detects_each_format(row: dict, fmt: str) -> None:
    assert detect_format(row) == fmt


def test_detection_failure_lists_columns_and_how_to_map() -> None:
    with pytest.raises(DataError, match=r"columns \['answer', 'question'\].*data.columns"):
        detect_format({"question": "q", "answer": "a"})


def test_column_mapping_reads_renamed_fields() -> None:
    columns = {"instruction": "question", "output": "answer"}
    assert detect_format({"question": "q", "answer": "a"}, columns) == "alpaca"
    ex = to_example({"question": "q", "answer": "a"}, "alpaca", "row 1", columns)
    assert ex.pairs() == (("user", "q"), ("assistant", "a"))
    turns = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    ex = to_example(turns, "messages", "row 1", {"messages": "dialog", "role": "speaker", "content": "text"})
    assert ex.pairs() == (("user", "hi"), ("assistant", "yo"))


def test_sharegpt_and_messages_give_the_same_turns_with_roles_mapped() -> None:
    sharegpt = to_example(SHAREGPT, "sharegpt", "row 1")
    assert sharegpt == to_example(MESSAGES | {"messages": MESSAGES["messages"]}, "messages", "row 1")
    assert [turn.role for turn in sharegpt.turns] == ["system", "user", "assistant", "user", "assistant"]


def test_alpaca_system_and_input_become_turns() -> None:
    ex = to_example({"system": "S", "instruction": "I", "input": "X", "output": "O"}, "alpaca", "row 1")
    assert ex.pairs() == (("system", "S"), ("user", "I\n\nX"), ("assistant", "O"))


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"instruction": "a"}, "alpaca", r"row 9: missing field 'output'"),
        ({"instruction": "a", "output": 3}, "alpaca", r"row 9: field 'output' must be a string, got int"),
        ({"conversations": []}, "sharegpt", r"row 9: field 'conversations' is an empty conversation"),
        ({"conversations": [{"from": "narrator", "value": "x"}]}, "sharegpt", r"conversations\[0\]: unknown role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages", r"messages\[0\]: .*must be a string or a list"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages", r"content\[0\]: a content part must be"),
        ({"messages": "not json"}, "messages", r"not a JSON list of turns"),
        ({"text": None}, "text", r"missing field 'text'"),
    ],
)
def test_bad_rows_name_the_row_and_field(row: dict, fmt: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        to_example(row, fmt, "row 9")


def test_role_map_accepts_extra_role_names() -> None:
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
    assert to_example(row, "sharegpt", "r", role_map={"narrator": "system"}).pairs()[0] == ("system", "x")


def test_only_assistant_turns_carry_loss_in_multi_turn_chat(tokenizer: Any) -> None:
    ex = to_example(SHAREGPT, "sharegpt", "row 1")
    assert trained_text(tokenizer, ex) == "four<|im_end|>five<|im_end|>"


def test_answer_ends_with_eos_and_full_sequence_loss_can_be_switched_on(tokenizer: Any) -> None:
    ex = to_example({"instruction": "Count the words.", "input": "cat dog", "output": "2"}, "alpaca", "r")
    [enc] = encode_examples(tokenizer, [ex], responses_only=True)
    trained = [t for t in enc.labels if t != IGNORE]
    assert enc.labels[0] == IGNORE and trained[-1] == tokenizer.eos_token_id == enc.input_ids[-1]
    [full] = encode_examples(tokenizer, [ex], responses_only=False)
    assert full.labels == full.input_ids == enc.input_ids


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer: Any) -> None:
    [enc] = encode_examples(tokenizer, [Example(text="the cat sat")], responses_only=True)
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids, skip_special_tokens=True) == "the cat sat"


def test_base_tokenizer_without_template_needs_a_named_one(base_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"no chat template.*data.chat_template"):
        configure_tokenizer(base_tokenizer, None)


def test_alpaca_template_marks_the_response_and_appends_eos(base_tokenizer: Any) -> None:
    assert configure_tokenizer(base_tokenizer, "alpaca") == "alpaca"
    ex = to_example({"instruction": "Spell 4.", "output": "four"}, "alpaca", "r")
    [enc] = encode_examples(base_tokenizer, [ex], responses_only=True)
    assert base_tokenizer.decode(enc.input_ids).startswith("### Instruction:\nSpell 4.\n\n### Response:\n")
    assert trained_text(base_tokenizer, ex) == "four<|im_end|>"


def test_chatml_template_uses_eos_where_the_vocab_lacks_im_end(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "</s>", "<pad>", *"abcdefghijklmnopqrstuvwxyz<>|_\n "])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    configure_tokenizer(tok, "chatml")
    assert tok.eos_token == "</s>"
    ex = Example(turns=(Turn("user", "hi"), Turn("assistant", "yo")))
    [enc] = encode_examples(tok, [ex], responses_only=True)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id


def test_llama3_template_needs_its_special_tokens_and_stops_on_eot(base_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="lacks <\\|start_header_id\\|>"):
        configure_tokenizer(base_tokenizer, "llama-3")
    base_tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    configure_tokenizer(base_tokenizer, "llama-3")
    assert base_tokenizer.eos_token == "<|eot_id|>"
    ex = to_example(SHAREGPT, "sharegpt", "row 1")
    assert trained_text(base_tokenizer, ex) == "four<|eot_id|>five<|eot_id|>"


def test_pad_token_is_never_eos(tokenizer: Any) -> None:
    tokenizer.pad_token = tokenizer.eos_token
    configure_tokenizer(tokenizer, None)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


# --- real-world row shapes (issue 14) ------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def prepare_fixture(name: str, model_dir: Path, out: Path, **cfg: Any) -> dict[str, Any]:
    from llmtune.config import DataConfig
    from llmtune.data import prepare

    return prepare(DataConfig(source=str(FIXTURES / name), **cfg), AutoTokenizer.from_pretrained(model_dir), out)


def test_unused_columns_are_listed_with_a_warning(tmp_path: Path, tiny_model_dir: Path) -> None:
    from io import StringIO

    from rich.console import Console

    from llmtune.data import report

    stats = prepare_fixture("unused_columns.jsonl", tiny_model_dir, tmp_path / "out")
    assert stats["unused_columns"] == ["id", "images"]
    [warning] = stats["warnings"]
    assert warning.startswith("Columns not used for training: id, images. images: only text is trained")
    printed = StringIO()
    report.print_report(stats, Console(file=printed, width=200))
    assert f"Data warning: {warning}" in printed.getvalue()
    assert "Columns not used for training" in (tmp_path / "out" / "report.html").read_text()


def test_a_system_column_opens_sharegpt_and_messages_rows() -> None:
    import json

    row = json.loads((FIXTURES / "sharegpt_system.jsonl").read_text().splitlines()[0])
    assert to_example(row, "sharegpt", "r").pairs()[:2] == (
        ("system", "Answer in one word."),
        ("user", "Colour of a lime?"),
    )
    renamed = {"persona": row["system"], "conversations": row["conversations"]}
    assert to_example(renamed, "sharegpt", "r", {"system": "persona"}).turns[0].role == "system"
    clash = {**row, "conversations": [{"from": "system", "value": "Be long."}, *row["conversations"]]}
    with pytest.raises(DataError, match="field 'system' and the conversation's own system turn differ"):
        to_example(clash, "sharegpt", "r")


def test_alpaca_history_becomes_the_earlier_turns(tokenizer: Any) -> None:
    import json

    row = json.loads((FIXTURES / "alpaca_history.json").read_text())[0]
    example = to_example(row, "alpaca", "r")
    assert example.pairs() == (
        ("user", "What is two plus two?"),
        ("assistant", "four"),
        ("user", "And times two?"),
        ("assistant", "eight"),
    )
    assert trained_text(tokenizer, example) == "four<|im_end|>eight<|im_end|>"
    with pytest.raises(DataError, match=r"history\[0\]: each history entry must be"):
        to_example({**row, "history": [["only the question"]]}, "alpaca", "r")


def test_content_parts_join_text_and_refuse_or_drop_the_rest(tmp_path: Path, tiny_model_dir: Path) -> None:
    import json

    rows = [json.loads(line) for line in (FIXTURES / "content_parts.jsonl").read_text().splitlines()]
    assert to_example(rows[0], "messages", "r").pairs() == (("user", "Count the words.\ncat dog"), ("assistant", "2"))
    with pytest.raises(
        DataError, match=r"line 2, messages\[0\], content\[0\]: a 'image_url' part.*non_text_parts: drop"
    ):
        prepare_fixture("content_parts.jsonl", tiny_model_dir, tmp_path / "a")
    stats = prepare_fixture("content_parts.jsonl", tiny_model_dir, tmp_path / "b", non_text_parts="drop")
    assert stats["rows_kept"] == 3 and stats["non_text_parts_dropped"] == 1


def test_empty_assistant_turns_are_masked_and_counted(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    import json

    row = json.loads((FIXTURES / "empty_answer.jsonl").read_text().splitlines()[0])
    assert trained_text(tokenizer, to_example(row, "messages", "r")) == "red<|im_end|>"
    stats = prepare_fixture("empty_answer.jsonl", tiny_model_dir, tmp_path / "out", eval_fraction=0.34)
    assert stats["empty_answers_masked"] == 1 and stats["rows_kept"] == 3


def test_openai_weight_zero_keeps_an_answer_in_the_prompt_without_loss(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Say red."},
            {"role": "assistant", "content": "blue", "weight": 0},
            {"role": "user", "content": "No, red."},
            {"role": "assistant", "content": "red", "weight": 1},
        ]
    }
    assert trained_text(tokenizer, to_example(row, "messages", "r")) == "red<|im_end|>"
    with pytest.raises(DataError, match="field 'weight' must be 0 or 1"):
        to_example({"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]}, "messages", "r")
