"""Preference files: DPO (chosen/rejected) and KTO (true/false labels) are recognised and refused by default, or
trained on their chosen answers with data.preference=chosen; never trained on the prompt alone or on bad answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from llmtune.config import DataConfig
from llmtune.data import DataError, ErrorLog, Loaded, detect_preference, load_examples, prepare

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DPO_FILES = ["dpo_sharegpt.json", "dpo_prompt.jsonl", "dpo_implicit.jsonl", "openai_preference.jsonl"]


def load(name: str, **cfg: Any) -> Loaded:
    return load_examples(DataConfig(source=str(FIXTURES / name), **cfg), ErrorLog("raise"))


@pytest.mark.parametrize("name", DPO_FILES)
def test_dpo_files_are_refused_with_what_they_are_and_the_setting(name: str) -> None:
    with pytest.raises(DataError, match=r"item 1|line 1") as raised:
        load(name)
    assert "this is a preference (DPO) file" in str(raised.value)
    assert "set data.preference: chosen" in str(raised.value)


@pytest.mark.parametrize("name", DPO_FILES)
def test_dpo_files_with_preference_chosen_train_the_chosen_answers_only(name: str) -> None:
    loaded = load(name, preference="chosen")
    assert loaded.preference == "dpo" and loaded.unused_columns == []
    for example in loaded.examples:
        roles = [turn.role for turn in example.turns]
        assert roles == ["user", "assistant"], roles
        assert example.turns[0].content.startswith("Spell ")
        assert "no idea" not in example.turns[1].content, "the rejected answer is never a target"
    assert [e.turns[1].content for e in loaded.examples][:2] in (["one", "two"], ["five", "six"])


def test_kto_file_is_refused_then_trained_on_the_answers_labelled_true(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(DataError, match=r"kto.jsonl, line 1: this is a KTO file.*data.preference: chosen"):
        load("kto.jsonl")
    cfg = DataConfig(source=str(FIXTURES / "kto.jsonl"), preference="chosen")
    stats = prepare(cfg, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "out")
    assert stats["rows_in"] == 5 and stats["rows_kept"] == 3 and stats["dropped"] == {"undesirable": 2}
    assert stats["preference"] == "kto" and stats["warnings"] == [], "deliberate drops are not a warning"
    targets = {e.turns[-1].content for e in load("kto.jsonl", preference="chosen").examples}
    assert targets == {"one", "three", "four"}


def test_a_label_column_that_is_not_true_or_false_is_not_kto() -> None:
    assert detect_preference({"text": "great film", "label": "positive"}) is None
    assert detect_preference({"prompt": "p", "completion": "c", "label": "False"}) == "kto"  # CSV cells are text


def test_cli_refuses_a_preference_file_in_one_paragraph(capsys: pytest.CaptureFixture[str]) -> None:
    import run as cli

    source = FIXTURES / "dpo_sharegpt.json"
    assert cli.main(["--pipeline", "prepare", "--set", f"data.source={source}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "item 1: this is a preference (DPO) file" in err
